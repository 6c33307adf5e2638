static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch"));
fn main() {
    println!("{}", PROGRAMS.len());
}
