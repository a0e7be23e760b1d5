// The selector of the per-level passes (downsample, coarse_attention, upsample_merge): which
// level a dispatch works on and the x size of its folded grid, one per dispatch, bound at a
// dynamic offset in group 1. Rust mirror: `LevelSelect` in `src/gpu/params.rs`.

struct LevelSelect {
    level: u32,        // index into params.levels (level l - 1)
    workgroups_x: u32, // x size of this dispatch's folded grid
}

@group(1) @binding(0) var<uniform> sel: LevelSelect;

// Linear workgroup index of this dispatch, folded into (x, y) to stay under 65535 per dimension.
fn level_workgroup(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * sel.workgroups_x;
}
