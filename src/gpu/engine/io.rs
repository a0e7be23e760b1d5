//! The tensors of one call to `gpu::Attention` (or one step of `gpu::Decoder`): host slices,
//! buffers resident on the GPU, or buffers recorded into the caller's encoder. Each kind says
//! what the call returns (`Out`): host inputs give host results, resident ones leave them in
//! the caller's buffers.

use crate::gpu::engine::tensors::{GpuTensors, GradTensors, Output};
use crate::gradients::Gradients;

/// Host Q, K, V (layouts of [`crate::Problem`]); the forward returns O and, when `lse`, the
/// LSE as host vectors ([`Output`]).
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    /// Queries (batch, heads, seq, head_dim).
    pub q: &'a [f32],
    /// Keys (batch, kv_heads, seq_kv, head_dim).
    pub k: &'a [f32],
    /// Values (batch, kv_heads, seq_kv, head_dim).
    pub v: &'a [f32],
    /// Read the LSE (batch, heads, seq) back too (a training forward always keeps it).
    pub lse: bool,
}

impl<'a> Host<'a> {
    /// Q, K, V from host slices; O and the LSE come back.
    pub fn new(q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        Self { q, k, v, lse: true }
    }

    /// O only: the LSE is not read back.
    pub fn without_lse(mut self) -> Self {
        self.lse = false;
        self
    }
}

/// Tensors already on the GPU ([`GpuTensors`]: storage buffers). One command buffer is
/// submitted and the call returns without waiting for the GPU; O and the LSE stay in the
/// caller's buffers. A head over one storage binding is processed chunk by chunk, one submit
/// each (Q, K, V then need `COPY_SRC` and O, the LSE `COPY_DST` usage).
#[derive(Clone, Copy, Debug)]
pub struct Resident<'a>(pub GpuTensors<'a>);

/// Tensors on the GPU, recorded into the caller's encoder without a submit: for callers that
/// embed attention in their own command stream (or put timestamps around it). The checks run
/// first and return typed errors; a validation error of the recorded commands surfaces at the
/// caller's `finish` or `submit`. Each tensor must fit one storage binding.
#[derive(Debug)]
pub struct Encode<'a>(pub &'a mut wgpu::CommandEncoder, pub GpuTensors<'a>);

/// Host dO (the forward's O layout); the backward returns the gradients as host vectors.
#[derive(Clone, Copy, Debug)]
pub struct HostGrad<'a>(pub &'a [f32]);

/// dO on the GPU (f32, `STORAGE`; f16 under [`crate::Storage::F16`], as dQ, dK, dV) and the
/// caller's gradient buffers; one submit, no wait.
#[derive(Clone, Copy, Debug)]
pub struct ResidentGrad<'a> {
    /// dL/dO, (batch, heads, seq, head_dim).
    pub dout: &'a wgpu::Buffer,
    /// dQ, dK, dV (and the learned weights' gradients), written.
    pub grads: GradTensors<'a>,
}

/// The forward's tensors as one value, whatever kind the caller gave.
pub(crate) enum ForwardArgs<'a> {
    Host(Host<'a>),
    Resident(GpuTensors<'a>),
    Encode(&'a mut wgpu::CommandEncoder, GpuTensors<'a>),
}

/// The backward's tensors as one value.
pub(crate) enum BackwardArgs<'a> {
    Host(&'a [f32]),
    Resident(&'a wgpu::Buffer, GradTensors<'a>),
}

pub(crate) mod sealed {
    /// Only the library's I/O kinds implement the I/O traits.
    pub trait Sealed {}
    impl Sealed for super::Host<'_> {}
    impl Sealed for super::Resident<'_> {}
    impl Sealed for super::Encode<'_> {}
    impl Sealed for super::HostGrad<'_> {}
    impl Sealed for super::ResidentGrad<'_> {}
}

/// The tensors of a forward: [`Host`] (returns [`Output`]), [`Resident`] or [`Encode`]
/// (return `()`).
#[allow(private_interfaces)] // sealed: the args enum is the library's own business
pub trait ForwardIo<'a>: sealed::Sealed {
    /// What the forward returns.
    type Out;
    #[doc(hidden)]
    fn args(self) -> ForwardArgs<'a>;
    #[doc(hidden)]
    fn out(out: Option<Output>) -> Self::Out;
}

/// The tensors of a training forward: [`Host`] (returns [`Output`]) or [`Resident`].
#[allow(private_interfaces)]
pub trait TrainIo<'a>: ForwardIo<'a> {}

/// The tensors of a backward: [`HostGrad`] (returns [`Gradients`]) or [`ResidentGrad`].
#[allow(private_interfaces)]
pub trait BackwardIo<'a>: sealed::Sealed {
    /// What the backward returns.
    type Out;
    #[doc(hidden)]
    fn args(self) -> BackwardArgs<'a>;
    #[doc(hidden)]
    fn out(grads: Option<Gradients<f32>>) -> Self::Out;
}

#[allow(private_interfaces)]
impl<'a> ForwardIo<'a> for Host<'a> {
    type Out = Output;
    fn args(self) -> ForwardArgs<'a> {
        ForwardArgs::Host(self)
    }
    fn out(out: Option<Output>) -> Output {
        // The host paths always return their output (`Attention::forward_args`).
        out.unwrap_or(Output {
            o: Vec::new(),
            lse: None,
        })
    }
}

#[allow(private_interfaces)]
impl<'a> ForwardIo<'a> for Resident<'a> {
    type Out = ();
    fn args(self) -> ForwardArgs<'a> {
        ForwardArgs::Resident(self.0)
    }
    fn out(_: Option<Output>) {}
}

#[allow(private_interfaces)]
impl<'a> ForwardIo<'a> for Encode<'a> {
    type Out = ();
    fn args(self) -> ForwardArgs<'a> {
        ForwardArgs::Encode(self.0, self.1)
    }
    fn out(_: Option<Output>) {}
}

impl<'a> TrainIo<'a> for Host<'a> {}
impl<'a> TrainIo<'a> for Resident<'a> {}

#[allow(private_interfaces)]
impl<'a> BackwardIo<'a> for HostGrad<'a> {
    type Out = Gradients<f32>;
    fn args(self) -> BackwardArgs<'a> {
        BackwardArgs::Host(self.0)
    }
    fn out(grads: Option<Gradients<f32>>) -> Gradients<f32> {
        // The host path always returns its gradients (`Attention::backward_args`).
        grads.unwrap_or(Gradients {
            dq: Vec::new(),
            dk: Vec::new(),
            dv: Vec::new(),
            weights: None,
            dsinks: None,
        })
    }
}

#[allow(private_interfaces)]
impl<'a> BackwardIo<'a> for ResidentGrad<'a> {
    type Out = ();
    fn args(self) -> BackwardArgs<'a> {
        BackwardArgs::Resident(self.dout, self.grads)
    }
    fn out(_: Option<Gradients<f32>>) {}
}
