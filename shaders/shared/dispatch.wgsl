// Per-dispatch selector of the backward passes, bound at a dynamic offset (one entry per
// dispatch): the coarse level a per-level pass works on, and the x size of the dispatch's
// folded grid. Rust mirror: `gpu::params::LevelSelect` (the same two u32s).

struct DispatchSelect {
    level: u32,        // index into params.levels (level l - 1); unused by whole-tensor passes
    workgroups_x: u32, // x size of this dispatch's folded grid
}

@group(1) @binding(0) var<uniform> sel: DispatchSelect;

// Linear workgroup index of this dispatch (folded into (x, y) under 65535 per dimension).
fn dispatch_workgroup(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * sel.workgroups_x;
}
