//! The WGSL index maps (`shaders/shared/geometry.wgsl`) evaluated on the GPU against their CPU
//! mirror (`multipole_attn::levels`), for every fine block, window and sub-window of every
//! level of many (n, m, p): near ranges and their inverse, far runs (bidirectional and causal)
//! and their inverse, sub-windows, their counts and children. One test shader imports the
//! geometry alone (no params, no bindings of the library), evaluates every case in one
//! dispatch into an output buffer poisoned with 0xFFFFFFFF (an unwritten slot fails), and the
//! host compares.

use crate::common::{gpu, read_buffer};
use std::collections::HashMap;

use multipole_attn::gpu::shaders::resolve_imports;
use multipole_attn::levels::{far_list, near_blocks, sub_window, Levels};
use wgpu::util::DeviceExt;

/// u32 outputs per case.
const SLOTS: usize = 24;
/// Most coarse levels a case may have (block records list the block's window at each).
const MAX_LEVELS: usize = SLOTS - 9;

const BLOCK: u32 = 0;
const WINDOW: u32 = 1;
const SUB: u32 = 2;

const SHADER: &str = r#"
#import geometry

// kind: 0 fine block a of size w; 1 window a of size w (of `windows`); 2 sub-window (a, j).
// lvl: block records: the levels to list block_window for; sub-window records: the level l.
struct Case {
    kind: u32,
    n: u32,
    w: u32,
    p: u32,
    a: u32,
    j: u32,
    lvl: u32,
    windows: u32,
}

const SLOTS: u32 = 24u;

@group(0) @binding(0) var<storage, read> cases: array<Case>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

fn put(at: u32, v: vec2<u32>) {
    out[at] = v.x;
    out[at + 1u] = v.y;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = gid.x + gid.y * groups.x * 64u;
    if (idx >= arrayLength(&cases)) {
        return;
    }
    let c = cases[idx];
    let o = idx * SLOTS;
    if (c.kind == 0u) {
        put(o, near_keys(c.n, c.w, c.a, false));
        put(o + 2u, near_keys(c.n, c.w, c.a, true));
        put(o + 4u, near_queries(c.n, c.w, c.a, false));
        put(o + 6u, near_queries(c.n, c.w, c.a, true));
        out[o + 8u] = window_count(c.n, c.w);
        for (var l = 0u; l < c.lvl; l++) {
            out[o + 9u + l] = block_window(c.a, l);
        }
    } else if (c.kind == 1u) {
        for (var causal = 0u; causal < 2u; causal++) {
            for (var run = 0u; run < 2u; run++) {
                put(o + 4u * causal + 2u * run, far_run(c.a, c.windows, causal == 1u, run));
                put(o + 8u + 4u * causal + 2u * run,
                    inverse_far_run(c.a, c.windows, causal == 1u, run));
            }
            out[o + 16u + causal] = far_count(c.a, c.windows, causal == 1u);
        }
        out[o + 18u] = window_count(c.n, c.w);
        put(o + 19u, window_range(c.n, c.w, c.a));
    } else {
        let s = sub_window(c.n, c.w, c.p, c.a, c.j);
        put(o, s);
        out[o + 2u] = sub_window_count(c.n, c.w, c.p, c.a, c.j);
        put(o + 3u, sub_window_of(c.w, c.p, s.x));
        put(o + 5u, sub_window_of(c.w, c.p, s.y - 1u));
        put(o + 7u, sub_window_child(c.p, c.a, c.j, 0u));
        put(o + 9u, sub_window_child(c.p, c.a, c.j, 1u));
    }
}
"#;

/// One case: (kind, n, w, p, a, j, lvl, windows), as the shader's `Case`.
type Case = [u32; 8];

/// (n, m, p) of every case: n = 1, 2, 7, 97, 1000, 1025, powers of two, a few others; every m
/// in {1, 3, 4, 8, 64} with every p that divides it.
fn configs() -> Vec<(usize, usize, usize)> {
    let ns = [1, 2, 3, 7, 8, 16, 64, 97, 128, 256, 1000, 1024, 1025, 4096];
    let mut out = Vec::new();
    for n in ns {
        for m in [1, 3, 4, 8, 64] {
            for p in (1..=m).filter(|p| m % p == 0) {
                out.push((n, m, p));
            }
        }
    }
    out
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (n, m, p) in configs() {
        let lv = Levels::new(n, m, p);
        assert!(lv.count() <= MAX_LEVELS, "n={n} m={m}: too many levels");
        let u = |x: usize| x as u32;
        for a0 in 0..lv.fine_blocks() {
            out.push([BLOCK, u(n), u(m), u(p), u(a0), 0, u(lv.count()), 0]);
        }
        for l in &lv.levels {
            for a in 0..l.windows {
                out.push([
                    WINDOW,
                    u(n),
                    u(l.window),
                    u(p),
                    u(a),
                    0,
                    u(l.level),
                    u(l.windows),
                ]);
                for j in 0..p {
                    out.push([SUB, u(n), u(l.window), u(p), u(a), u(j), u(l.level), 0]);
                }
            }
        }
    }
    out
}

/// For every window b of `windows`: the windows whose far list holds b, in increasing order.
fn inverse_table(windows: usize, causal: bool) -> Vec<Vec<usize>> {
    let mut inv = vec![Vec::new(); windows];
    for a in 0..windows {
        for b in far_list(a, causal, windows) {
            inv[b].push(a);
        }
    }
    inv
}

/// The windows of runs [x, y) in order; None when a run is malformed (x > y or past the
/// `windows` that exist).
fn expand(runs: &[u32], windows: usize) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for r in runs.chunks(2) {
        if r[0] > r[1] || r[1] as usize > windows {
            return None;
        }
        out.extend(r[0] as usize..r[1] as usize);
    }
    Some(out)
}

/// Compares case `c`'s outputs `got` with what `levels` says; `inverse[causal][b]` lists the
/// windows whose far list holds b. Returns the mismatches as messages.
fn check(c: &Case, got: &[u32], inverse: &[Vec<Vec<usize>>; 2]) -> Vec<String> {
    let [kind, n, w, p, a, j, lvl, windows] = c.map(|x| x as usize);
    let mut bad = Vec::new();
    let want = |slot: usize, value: usize, what: &str| {
        (got[slot] as usize != value || got[slot] == u32::MAX)
            .then(|| format!("{what}: slot {slot} = {:#x}, want {value}", got[slot]))
    };
    match kind as u32 {
        BLOCK => {
            let m = w;
            let blocks = n.div_ceil(m);
            for (k, causal) in [false, true].into_iter().enumerate() {
                let nb = near_blocks(a, causal, blocks);
                bad.extend(want(2 * k, nb.start * m, "near_keys first"));
                bad.extend(want(2 * k + 1, (nb.end * m).min(n), "near_keys end"));
                // The query blocks whose near field holds block a (contiguous).
                let readers: Vec<_> = (a.saturating_sub(2)..(a + 3).min(blocks))
                    .filter(|&q| near_blocks(q, causal, blocks).contains(&a))
                    .collect();
                let (lo, hi) = (readers[0], readers[readers.len() - 1]);
                assert_eq!(
                    hi - lo + 1,
                    readers.len(),
                    "readers of a block are contiguous"
                );
                bad.extend(want(4 + 2 * k, lo * m, "near_queries first"));
                bad.extend(want(5 + 2 * k, ((hi + 1) * m).min(n), "near_queries end"));
            }
            let lv = Levels::new(n, m, p);
            bad.extend(want(8, lv.fine_blocks(), "window_count(n, m)"));
            for (l, level) in lv.levels.iter().enumerate() {
                bad.extend(want(9 + l, a * m / level.window, "block_window"));
            }
        }
        WINDOW => {
            for (k, causal) in [false, true].into_iter().enumerate() {
                let far = &got[4 * k..4 * k + 4];
                let list = far_list(a, causal, windows);
                match expand(far, windows) {
                    Some(v) if v == list => {}
                    _ => bad.push(format!("far runs causal={causal}: {far:?}, want {list:?}")),
                }
                // Run 0 before a, run 1 after it.
                if far[..2].iter().any(|&b| b as usize > a)
                    || (far[2] < far[3] && far[2] as usize <= a)
                {
                    bad.push(format!(
                        "far runs causal={causal} not before/after: {far:?}"
                    ));
                }
                let inv = &got[8 + 4 * k..12 + 4 * k];
                let readers = &inverse[k][a];
                match expand(inv, windows) {
                    Some(v) if v == *readers => {}
                    _ => bad.push(format!(
                        "inverse runs causal={causal}: {inv:?}, want {readers:?}"
                    )),
                }
                bad.extend(want(16 + k, list.len(), "far_count"));
            }
            bad.extend(want(18, windows, "window_count(n, w)"));
            bad.extend(want(19, a * w, "window_range first"));
            bad.extend(want(20, ((a + 1) * w).min(n), "window_range end"));
        }
        _ => {
            let m = w >> (lvl - 1);
            let s = sub_window(n, m, p, lvl, a, j);
            bad.extend(want(0, s.start, "sub_window first"));
            bad.extend(want(1, s.end, "sub_window end"));
            bad.extend(want(2, s.len(), "sub_window_count"));
            if !s.is_empty() {
                bad.extend(want(3, a, "sub_window_of(first).a"));
                bad.extend(want(4, j, "sub_window_of(first).j"));
                bad.extend(want(5, a, "sub_window_of(last).a"));
                bad.extend(want(6, j, "sub_window_of(last).j"));
            }
            let child_ok = |k: usize| got[k] as usize <= 2 * a + 1 && (got[k + 1] as usize) < p;
            if lvl >= 2 && !(child_ok(7) && child_ok(9)) {
                bad.push(format!("children {:?} out of range", &got[7..11]));
            } else if lvl >= 2 {
                // The two level l-1 children, in order, tile S(l, a, j).
                let c0 = sub_window(n, m, p, lvl - 1, got[7] as usize, got[8] as usize);
                let c1 = sub_window(n, m, p, lvl - 1, got[9] as usize, got[10] as usize);
                let full = sub_window(n, m, p, lvl, a, j);
                if c0.start != full.start
                    || c0.end != c1.start
                    || c1.end != full.end
                    || (got[7], got[8]) >= (got[9], got[10])
                {
                    bad.push(format!("children {:?} do not tile {full:?}", &got[7..11]));
                }
            }
        }
    }
    bad
}

#[test]
fn wgsl_geometry_matches_levels_rs() {
    let Some(ctx) = gpu() else { return };
    let cases = cases();
    let device = &ctx.device;
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("geometry test"),
        source: wgpu::ShaderSource::Wgsl(resolve_imports(SHADER).into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("geometry test"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        panic!("the geometry test shader does not build: {e}");
    }
    let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("cases"),
        contents: bytemuck::cast_slice(&cases),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let poison = vec![u32::MAX; cases.len() * SLOTS];
    assert!((poison.len() * 4) as u64 <= ctx.limits.max_storage_buffer_binding_size);
    let output = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("geometry out"),
        contents: bytemuck::cast_slice(&poison),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("geometry test"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: input.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: output.as_entire_binding(),
            },
        ],
    });
    let groups = cases.len().div_ceil(64) as u32;
    let x = groups.min(ctx.limits.max_compute_workgroups_per_dimension);
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(x, groups.div_ceil(x), 1);
    }
    ctx.queue.submit([enc.finish()]);
    // f32 copies keep their bits (0xFFFFFFFF is a NaN pattern, compared as bits only).
    let got: Vec<u32> = read_buffer(ctx, &output)
        .into_iter()
        .map(f32::to_bits)
        .collect();

    // The inverse far lists by brute force over every window, per (windows, causal).
    let mut inverses: HashMap<usize, [Vec<Vec<usize>>; 2]> = HashMap::new();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let windows = c[7] as usize;
        let inv = inverses
            .entry(windows)
            .or_insert_with(|| [inverse_table(windows, false), inverse_table(windows, true)]);
        let bad = check(c, &got[i * SLOTS..(i + 1) * SLOTS], inv);
        failures.extend(bad.into_iter().map(|m| format!("case {c:?}: {m}")));
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong; first:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}
