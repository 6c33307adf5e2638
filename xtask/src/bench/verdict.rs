//! Placeholder until this section is written.

use anyhow::{Result, bail};

use super::{Ctx, Section};

pub fn run(_ctx: &Ctx) -> Result<Section> {
    bail!("the verdict benchmark is not written yet")
}
