//! # multipole-attn
//!
//! Fast Multipole Attention (Kang, Tran, De Sterck, arXiv 2310.11960) as WGSL compute shaders
//! through wgpu. See `README.md` for the algorithm in a paragraph and `levels` for a drawing of
//! which keys a query sees at each level.
#![warn(missing_docs)]
// On wasm32 wgpu's handles are not Send (the browser is one thread); the Arcs that make the
// executors shareable between native threads are then merely reference counts.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

pub mod closeness;
pub mod config;
pub mod conformance;
pub mod cpu;
pub mod cross;
pub mod error;
pub mod geometry;
pub mod gpu;
pub mod gradients;
pub mod levels;
pub mod method;
pub mod plan;
pub mod problem;
pub mod random;
pub mod sequences;
pub mod shape;
pub mod storage;
pub mod variants;
pub mod weights;

pub use config::{DecodeConfig, Downsample, FmaConfig, Queries};
pub use error::{FmaError, Result};
pub use geometry::{Geometry, Grid};
pub use gradients::{Gradients, LevelGradients};
pub use method::Method;
pub use problem::Problem;
pub use sequences::{SeqLayout, Sequences};
pub use shape::Shape;
pub use storage::Storage;
pub use variants::{HeadSpan, Variants, Window};
pub use weights::{LearnedWeights, LevelWeights};
