//! Control-socket requests, answered by the guard: each typed request
//! becomes a call on the [`Guard`] actor (or the pipeline, for a
//! subscription), and its result the typed answer.

use std::io;

use super::{
    actor::{Change, Guard, Shutdown},
    loading::Loaded,
};
use crate::{
    control::{
        protocol::{ChangeResponse, Request, Response},
        server::{ControlRequest, Reply},
    },
    model::{Event, Requester},
    pipeline::Pipeline,
    runloop::Flow,
};

impl Guard {
    /// Answers one request; Stop after a `shutdown`.
    pub fn handle_request(
        &mut self,
        pipeline: &mut Pipeline,
        req: ControlRequest,
    ) -> io::Result<Flow> {
        let by = Requester {
            uid: Some(req.peer.uid),
            pid: Some(req.peer.pid),
        };
        let mut flow = Flow::Continue;
        let reply = match req.request {
            Request::Allow {
                rule,
                force,
                confirm_within,
            } => {
                let how = Change::new(pipeline, by, force).confirm_within(confirm_within);
                let result = self.allow(rule, &how);
                self.changed(pipeline, result)?
            }
            Request::Deny {
                ports,
                force,
                confirm_within,
            } => {
                let how = Change::new(pipeline, by, force).confirm_within(confirm_within);
                let result = self.deny(ports, &how);
                self.changed(pipeline, result)?
            }
            Request::Apply {
                text,
                policy,
                force,
                confirm_within,
            } => {
                let how = Change::new(pipeline, by, force).confirm_within(confirm_within);
                let result = self.apply(text, *policy, &how);
                self.changed(pipeline, result)?
            }
            Request::Confirm => {
                let result = self.confirm(by);
                self.changed(pipeline, result)?
            }
            Request::Diff { policy } => Reply::Once(match self.diff(*policy, pipeline, by) {
                Ok(diff) => Response::Diff(diff),
                Err(e) => Response::Error(e),
            }),
            Request::Reload { force } => {
                // Answered when the file, read off the loop, is in force.
                self.start_reload(by, force, Some(req.reply));
                return Ok(flow);
            }
            Request::Policy => Reply::Once(Response::Policy(self.policy_view())),
            Request::Status => Reply::Once(Response::Status(Box::new(self.status(pipeline)))),
            Request::StatusLines => {
                Reply::Once(Response::StatusLines(Box::new(self.status(pipeline))))
            }
            Request::Explain(query) => Reply::Once(match self.explain(&query) {
                Ok(answer) => Response::Explain(Box::new(answer)),
                Err(e) => Response::Error(e),
            }),
            Request::Verify => {
                // Answered when its last chunk is probed.
                self.request_verify(pipeline, req.reply);
                return Ok(flow);
            }
            Request::Learn(query) => Reply::Once(match self.propose(pipeline, &query, by) {
                Ok(proposal) => Response::Learn(Box::new(proposal)),
                Err(e) => Response::Error(e),
            }),
            Request::Record { secs, forget } => Reply::Once(match self.record(secs, forget) {
                Ok(answer) => Response::Change(answer),
                Err(e) => Response::Error(e),
            }),
            Request::Subscribe { format, colour } => Reply::Stream {
                lines: pipeline.subscribe(format, colour),
            },
            Request::Shutdown { detach } => {
                self.shutdown = Some(if detach {
                    Shutdown::Detach
                } else {
                    Shutdown::KeepEnforcing
                });
                flow = Flow::Stop;
                Reply::Once(Response::Change(ChangeResponse {
                    change: if detach {
                        "shutdown, detaching".into()
                    } else {
                        "shutdown, enforcement stays".into()
                    },
                    policy: None,
                }))
            }
        };
        // A client that gave up waiting is no concern of ours.
        let _ = req.reply.send(reply);
        Ok(flow)
    }

    /// SIGHUP: a reload on behalf of whoever sent the signal. It cannot
    /// be forced: one that would cut off an SSH session is refused.
    pub fn reload_on_signal(&mut self) {
        self.start_reload(Requester::default(), false, None);
    }

    /// A reload's file, read off the loop, put in force; the answer to
    /// whoever asked (a SIGHUP's failure is logged).
    pub fn reload_loaded(&mut self, pipeline: &mut Pipeline, loaded: Loaded) -> io::Result<()> {
        let how = Change::new(pipeline, loaded.by, loaded.force);
        let result = self.finish_reload(loaded.text, loaded.policy, &how);
        match loaded.reply {
            Some(reply) => {
                let answer = self.changed(pipeline, result)?;
                // A client that gave up waiting is no concern of ours.
                let _ = reply.send(answer);
            }
            None => {
                if let Err(e) = &result {
                    log::warn!("SIGHUP: reload failed: {e}");
                }
                self.changed(pipeline, result)?;
            }
        }
        Ok(())
    }

    /// Announces a change that went through and gives the pipeline the new
    /// exposure view; the answer either way.
    fn changed(
        &mut self,
        pipeline: &mut Pipeline,
        result: Result<(ChangeResponse, Event), String>,
    ) -> io::Result<Reply> {
        Ok(Reply::Once(match result {
            Ok((answer, event)) => {
                pipeline.set_exposure(self.exposure_view());
                pipeline.emit(event)?;
                // "Test after enabling", by the kernel's own program.
                self.verify_after(pipeline, &answer.change);
                Response::Change(answer)
            }
            Err(e) => Response::Error(e),
        }))
    }
}
