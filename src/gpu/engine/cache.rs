//! The two kinds of per-call state the executors keep: small uniforms per shape (a bounded
//! [`ShapeCache`]), and large buffers that grow by capacity ([`Growing`]) so that a new shape,
//! or a sequence one token longer, reuses what is there instead of allocating anew.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::engine::buffers::storage;
use crate::gpu::engine::pipelines::poisoned;

/// Shapes whose uniforms are kept; beyond this the cache is cleared (a long-running caller
/// cycling through many shapes should not grow memory without bound; uniforms are ~1 KiB).
pub(crate) const MAX_CACHED_SHAPES: usize = 64;

/// A bounded map from a key (a shape, or a plan's shape and kind) to state made once for it,
/// shared between threads.
pub(crate) struct ShapeCache<K, V> {
    map: Mutex<HashMap<K, Arc<V>>>,
}

impl<K: Eq + Hash + Copy, V> Default for ShapeCache<K, V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy, V> ShapeCache<K, V> {
    /// The state of `key`, made by `make` on first use.
    pub fn get_or_make(&self, key: K, make: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        let mut map = self.map.lock().map_err(poisoned)?;
        if let Some(v) = map.get(&key) {
            return Ok(v.clone());
        }
        if map.len() >= MAX_CACHED_SHAPES {
            map.clear();
        }
        let v = Arc::new(make()?);
        map.insert(key, v.clone());
        Ok(v)
    }
}

/// A storage buffer that grows to the largest size asked of it: reallocated (contents not
/// kept) only when a call needs more than it holds, then by at least half again, up to
/// `cap` bytes (a storage binding's limit), so a growing sequence reallocates O(log n) times.
pub(crate) struct Growing {
    label: &'static str,
    usage: wgpu::BufferUsages,
    buf: Option<wgpu::Buffer>,
}

impl Growing {
    /// An empty buffer of `STORAGE | usage`.
    pub const fn new(label: &'static str, usage: wgpu::BufferUsages) -> Self {
        Self {
            label,
            usage,
            buf: None,
        }
    }

    /// The buffer, at least `bytes` long (and never longer than `max(bytes, cap)`).
    pub fn at_least(&mut self, device: &wgpu::Device, bytes: u64, cap: u64) -> &wgpu::Buffer {
        let have = self.buf.as_ref().map_or(0, |b| b.size());
        if have < bytes.max(16) {
            self.buf = None;
        }
        let (label, usage) = (self.label, self.usage);
        self.buf.get_or_insert_with(|| {
            storage(device, label, (have + have / 2).min(cap).max(bytes), usage)
        })
    }

    /// Bytes allocated now (0 before the first use).
    pub fn allocated(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.size())
    }
}
