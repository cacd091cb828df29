//! Peer models: what a user would run instead of Portcullis, set up with
//! the same rules so their cost can be read side by side with ours. They
//! are written here for the benchmark and are not part of the product.

pub mod fanotify;
pub mod nft;
