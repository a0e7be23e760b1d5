// The per-dispatch selector of the per-level and backward passes, bound at a dynamic offset
// in group 1 (one entry per dispatch): the coarse level a dispatch works on and the x size of
// its folded grid, and two words whose meaning is the pass's (`Dispatch::args`). Rust mirror:
// `LevelSelect` in `src/gpu/engine/params.rs` (the same four u32s).

struct LevelSelect {
    level: u32,        // index into params.levels (level l - 1); unused by whole-tensor passes
    workgroups_x: u32, // x size of this dispatch's folded grid
    arg0: u32,         // backward_dkv_coarse(_combine): reader chunks per coarse row
    arg1: u32,         // backward_dkv_coarse: queries per chunk; its combine: the round's stride
}

@group(1) @binding(0) var<uniform> sel: LevelSelect;

// Linear workgroup index of this dispatch, folded into (x, y) to stay under 65535 per dimension.
fn dispatch_workgroup(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * sel.workgroups_x;
}
