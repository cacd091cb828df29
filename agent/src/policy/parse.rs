//! (being written)
use std::path::PathBuf;
#[derive(Debug)]
pub struct PolicyError;
pub fn load_paths(_p: &[PathBuf]) -> Result<Vec<super::Policy>, Vec<PolicyError>> { todo!() }
pub fn parse_str(_s: &str, _f: &std::path::Path) -> Result<Vec<super::Policy>, Vec<PolicyError>> { todo!() }
