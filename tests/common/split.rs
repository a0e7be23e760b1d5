//! The split-training tests' shared harness (`tests/gpu/backward_split*.rs`,
//! `grid_backward_split.rs`, `dense_backward_split.rs`, `varlen_backward_groups.rs`): a
//! method's unsplit executor and a split one capped at a small binding on the same context (so
//! both use the same kernels), trained on the same host inputs, and the checks each such test
//! makes: that the split run cannot pass by not splitting, its outputs and gradients against
//! the unsplit run's, a second split run's bits, the f64 reference, and the typed errors of
//! resident tensors and gradients that do not split. Each test module keeps its cases and says
//! why its tolerances hold.

use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{
    Attention, GpuContext, GradTensors, Output, Resident, ResidentGrad, Saved,
};
use multipole_attn::plan::{BackwardSplitPlan, KernelLimits};
use multipole_attn::{FmaError, Gradients, Method, Problem, Shape};

use super::gradients::{
    buffer, compare, compare_all, host_gradients_with, inputs, nan, regrouped, weight_pairs, Inputs,
};
use super::{read_buffer, Poisoned};

/// One case: `method`'s unsplit executor and its split one, the problem and its N(0, 1)
/// inputs.
pub struct SplitCase {
    /// Names the case in every assertion.
    pub label: String,
    pub method: Method,
    pub problem: Problem,
    pub x: Inputs,
    /// The adapter's binding: the problem unsplit.
    pub whole: Attention,
    /// Capped at the case's binding (`Attention::max_binding`).
    pub split: Attention,
}

impl SplitCase {
    /// `method` on `ctx`, unsplit and capped at `cap` bytes per binding; the inputs of `problem`
    /// from `seed`.
    pub fn new(
        ctx: &GpuContext,
        label: String,
        seed: u64,
        (method, problem): (&Method, &Problem),
        cap: u64,
    ) -> Self {
        let att = || Attention::new(ctx, method.clone()).unwrap();
        Self {
            x: inputs(seed, problem.shape),
            whole: att(),
            split: att().max_binding(cap).unwrap(),
            label,
            method: method.clone(),
            problem: problem.clone(),
        }
    }

    /// Asserts that the split executor's backward of `p` (the case's problem, one head of it,
    /// or what the split run binds) exceeds its binding, `what` naming `p`: the split run
    /// cannot pass by not splitting.
    pub fn assert_over_binding(&self, p: &Problem, what: &str) {
        assert!(
            matches!(
                self.split.backward_plan(p),
                Err(FmaError::LimitExceeded { .. })
            ),
            "{}: {what} fits one binding",
            self.label
        );
    }

    /// The split plan (under `limits`) of one head of the case, an FMA problem, after asserting
    /// that one head's backward exceeds the split executor's binding.
    pub fn one_head_split(&self, limits: &KernelLimits) -> BackwardSplitPlan {
        let Method::Fma(cfg) = &self.method else {
            panic!("{}: a split head is FMA's", self.label);
        };
        let (n, d) = (self.problem.shape.seq, self.problem.shape.head_dim);
        let one = Problem::new(Shape::new(1, 1, n, d)).causal(self.problem.causal);
        self.assert_over_binding(&one, "one head");
        BackwardSplitPlan::new(n, d, cfg, limits).expect(&self.label)
    }

    /// The training forward and backward of the case's host inputs on `att` with dO = `dout`.
    pub fn run(&self, att: &Attention, dout: &[f32]) -> (Output, Gradients<f32>) {
        host_gradients_with(att, &self.problem, &self.x, dout)
    }

    /// [`SplitCase::run`] on the unsplit executor with the inputs' dO.
    pub fn unsplit(&self) -> (Output, Gradients<f32>) {
        self.run(&self.whole, &self.x.dout)
    }

    /// [`SplitCase::run`] on the split executor with the inputs' dO.
    pub fn split(&self) -> (Output, Gradients<f32>) {
        self.run(&self.split, &self.x.dout)
    }

    /// Asserts that a second split training step gives the bits of the first's `out` and `g`.
    pub fn assert_repeatable(&self, out: &Output, g: &Gradients<f32>) {
        let (again_out, again) = self.split();
        for (name, a, b) in [
            ("O", &again_out.o, &out.o),
            ("dQ", &again.dq, &g.dq),
            ("dK", &again.dk, &g.dk),
            ("dV", &again.dv, &g.dv),
        ] {
            same_bits_no_nan(&self.label, &format!("{name} of a second split run"), a, b);
        }
        assert_eq!(&again, g, "{}: two split runs differ", self.label);
    }

    /// The gradients `g` against the f64 reference (`cpu::backward` of the case) within the
    /// backward tolerance: dQ, dK, dV, the learned weights' ([`compare_all`]) and the sinks';
    /// returns the worst error of the scale.
    pub fn against_reference(&self, g: &Gradients<f32>) -> f64 {
        let x = &self.x;
        let r = cpu::backward(
            &self.method,
            &self.problem,
            (&widen(&x.q), &widen(&x.k), &widen(&x.v)),
            &widen(&x.dout),
        )
        .unwrap();
        let mut worst = compare_all(&self.label, g, &r);
        if let (Some(a), Some(b)) = (&g.dsinks, &r.dsinks) {
            worst = worst.max(compare(&self.label, "dsinks", a, b));
        }
        worst
    }
}

/// Asserts that `got` holds the bits of `want` (a NaN matches a NaN of the same bits, -0 does
/// not match +0), naming how many elements differ and the first.
pub fn same_bits(label: &str, name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: {name} length");
    let differ = |(a, b): (&f32, &f32)| a.to_bits() != b.to_bits();
    if let Some(i) = got.iter().zip(want).position(differ) {
        let count = got.iter().zip(want).filter(|&p| differ(p)).count();
        panic!(
            "{label}: {name}: {count} of {} elements differ, first [{i}]: {} against {}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Asserts that `got` holds the bits of `want` and no NaN (which no output or gradient of
/// these inputs is): what `assert_eq!` asserts, and -0 is not +0.
pub fn same_bits_no_nan(label: &str, name: &str, got: &[f32], want: &[f32]) {
    let nan = got.iter().position(|x| x.is_nan());
    assert!(nan.is_none(), "{label}: {name}[{nan:?}] is NaN");
    same_bits(label, name, got, want);
}

/// The split run (`out_s`, `g_s`) against the unsplit one where the split keeps the unsplit
/// bits of O, the LSE and dQ: those asserted the same bits ([`same_bits_no_nan`]); dK and dV the
/// same bits when `dkv_bits`, else within WTOL of their scale ([`regrouped`]); the sums over
/// heads and sequences within WTOL ([`regrouped_sums`]). Returns the worst regrouping error
/// (of the scale; 0 where all is bitwise).
pub fn bitwise_but_sums(
    label: &str,
    (out_s, g_s): (&Output, &Gradients<f32>),
    (out_u, g_u): (&Output, &Gradients<f32>),
    dkv_bits: bool,
) -> f64 {
    let lse = |o: &Output| o.lse.clone().unwrap_or_else(|| panic!("{label}: no LSE"));
    same_bits_no_nan(label, "O", &out_s.o, &out_u.o);
    same_bits_no_nan(label, "LSE", &lse(out_s), &lse(out_u));
    same_bits_no_nan(label, "dQ", &g_s.dq, &g_u.dq);
    let dkv = if dkv_bits {
        same_bits_no_nan(label, "dK", &g_s.dk, &g_u.dk);
        same_bits_no_nan(label, "dV", &g_s.dv, &g_u.dv);
        0.0
    } else {
        regrouped(label, "dK", &g_s.dk, &g_u.dk).max(regrouped(label, "dV", &g_s.dv, &g_u.dv))
    };
    dkv.max(regrouped_sums(label, g_s, g_u))
}

/// The sums over heads and sequences of the split run's gradients `a` (each level's learned
/// weights' and the sinks') against the unsplit run's `b`, each within WTOL of its scale
/// ([`regrouped`]: the split adds its pieces' sums in order, the unsplit run sums one tree);
/// both sides must have the same levels and sinks. Returns the worst error (of the scale).
pub fn regrouped_sums(label: &str, a: &Gradients<f32>, b: &Gradients<f32>) -> f64 {
    if let (Some(wa), Some(wb)) = (&a.weights, &b.weights) {
        assert_eq!(wa.len(), wb.len(), "{label}: levels");
    }
    let mut worst = 0.0f64;
    for (name, x, y) in weight_pairs(label, a, b) {
        worst = worst.max(regrouped(label, &name, x, y));
    }
    match (&a.dsinks, &b.dsinks) {
        (Some(x), Some(y)) => worst = worst.max(regrouped(label, "dsinks", x, y)),
        (None, None) => {}
        _ => panic!("{label}: sink gradients on one side only"),
    }
    worst
}

/// Asserts that training `att` on resident buffers (NaN-poisoned outputs, `usage` besides) of
/// `problem` over a binding is refused before the forward runs: a binding limit naming the
/// resident buffers and saying to train on host tensors (HostGrad), the outputs still NaN.
pub fn resident_training_refused(
    ctx: &GpuContext,
    att: &Attention,
    (problem, x): (&Problem, &Inputs),
    usage: wgpu::BufferUsages,
    label: &str,
) {
    let bufs = Poisoned::with_usage(ctx, &x.q, &x.k, &x.v, problem.shape, usage);
    let e = att
        .train(problem, Resident(bufs.tensors()))
        .expect_err("resident tensors over a binding");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, advice, .. }
            if what.contains("resident") && advice.contains("HostGrad")),
        "{label}: {e}"
    );
    let (o, lse) = bufs.read(ctx);
    assert!(
        o.iter().chain(&lse).all(|v| v.is_nan()),
        "{label}: the forward ran"
    );
}

/// Asserts that the backward of `saved`, a forward saved in pieces (runs of heads, a split
/// head, groups of sequences), into resident gradient buffers with dO = `dout` is refused
/// (`what`: which pieces) saying to use HostGrad, and leaves the buffers' NaN untouched.
/// Returns the error, for what else it must say.
pub fn resident_backward_refused(
    ctx: &GpuContext,
    att: &Attention,
    (saved, dout): (&Saved, &[f32]),
    what: &str,
) -> FmaError {
    let shape = saved.problem().shape;
    let dout = buffer(ctx, "dout", dout);
    let (dq, dk, dv) = (
        nan(ctx, "dq", shape.elements()),
        nan(ctx, "dk", shape.kv_elements()),
        nan(ctx, "dv", shape.kv_elements()),
    );
    let grads = GradTensors {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        weights: None,
    };
    let e = att
        .backward(saved, ResidentGrad { dout: &dout, grads })
        .expect_err(&format!("resident gradients of {what}"));
    assert!(
        matches!(&e, FmaError::InvalidConfig { allowed, .. } if allowed.contains("HostGrad")),
        "{what}: {e}"
    );
    for b in [&dq, &dk, &dv] {
        assert!(
            read_buffer(ctx, b).iter().all(|v| v.is_nan()),
            "{what}: written"
        );
    }
    e
}
