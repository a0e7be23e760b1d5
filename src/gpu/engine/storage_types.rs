//! f16 storage at shader composition (issue 29): the f16 variant of a composed pass. The
//! pass's WGSL is written for f32 tensors (`array<f32>` bindings, plain loads and stores);
//! [`to_f16_storage`] rewrites the bindings that hold Q, K, V, O, dO and the gradients to
//! `array<f16>`, wraps every load of them in `f32(..)` and every stored value in `f16(..)`,
//! and prepends `enable f16;`. Arithmetic, workgroup tiles and the softmax state stay f32, so
//! the f16 variant computes what the f32 one does on the rounded inputs, rounding O once.
//!
//! The dense forward passes resume a row's partial (O, LSE) after every key chunk
//! (`shaders/dense_attention.wgsl`); resumed from an f16 O, each chunk would round the partial
//! once more. Their f16 variant ([`to_f16_storage_with`], a [`KeptPartial`]) therefore also
//! declares an f32 binding for the partial (`passes::f16_only_bindings`): O's loads (the
//! resume, the only ones) read it instead, and every store of O also keeps the f32 value there
//! while keys remain (`params.key_hi < params.n_kv`), so O is rounded once, from the f32
//! result of the last chunk: the f32 variant's O rounded to f16.
//!
//! The dense backward's passes do the same with their gradients: `dense_backward_dq.wgsl`
//! adds each key part's dQ to what the previous part stored, `dense_backward_dkv.wgsl` each
//! query part's dK, dV (`plan::DenseBackwardPlan::key_chunks`, `query_chunks`). Their f16
//! variants bind f32 partials of dQ (`dq_partial`) and of dK, dV (`dk_partial`, `dv_partial`):
//! a later part reads the f32 sums, a part after which keys (queries) remain keeps them, and
//! every part stores the f16 gradient once from the f32 sum, so dQ, dK, dV are the f32
//! variant's rounded to f16 once ([`kept_partials`]).
//!
//! Why a rewrite rather than an alias in every shader: the f32 variant is then the text the
//! passes always composed (not merely an equivalent one), and the shaders keep their one
//! spelling of each load. The rewrite is strict: an access it cannot place (a compound
//! assignment, an index or a store spanning lines) panics, and a test composes every pass in
//! both storages and validates it with naga, so a shader change that breaks it fails there.

use crate::error::{FmaError, Result};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::passes::{desc, Role};
use crate::plan::Pass;
use crate::storage::Storage;

/// Checks that `ctx`'s device can run `storage`: f16 needs `SHADER_F16` (requested by
/// `negotiate_features` wherever the adapter offers it).
pub(crate) fn check_device_storage(ctx: &GpuContext, storage: Storage) -> Result<()> {
    if storage == Storage::F32 || ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return Ok(());
    }
    Err(FmaError::MissingFeature {
        what: "f16 storage (Storage::F16)".into(),
        feature: "SHADER_F16",
        adapter: ctx.info.name.clone(),
        advice: "use f32 storage (Storage::F32, the CLI's --storage f32) on this adapter, or an \
                 adapter with shader-f16 (a browser without it has none; with \
                 ContextOptions::browser_limits the device never requests it)"
            .into(),
    })
}

/// The roles stored as f16 under [`crate::Storage::F16`]: the caller's tensors and their
/// gradients, and the decoding cache's copies of K and V (its ring and history pages: tokens
/// as they came, each rounded once). Internal rows (coarse keys, values, queries, the
/// decoder's coarse slots, which hold running sums, partial outputs, LSE, statistics) stay
/// f32.
const F16_ROLES: [Role; 11] = [
    Role::Q,
    Role::K,
    Role::V,
    Role::Out,
    Role::DOut,
    Role::DQ,
    Role::DK,
    Role::DV,
    Role::Ring,
    Role::PageK,
    Role::PageV,
];

/// The directive an f16 variant starts with.
pub(crate) const F16_DIRECTIVE: &str = "enable f16;\n";

/// The WGSL names of `pass`'s bindings that hold an f16 role.
pub(crate) fn f16_bindings(pass: Pass) -> Vec<&'static str> {
    desc(pass)
        .bindings
        .iter()
        .filter(|b| F16_ROLES.contains(&b.role))
        .map(|b| b.name)
        .collect()
}

/// `text` (a composed pass) with the storage arrays `names` as f16: see the module's doc.
/// Unchanged when `names` is empty.
pub(crate) fn to_f16_storage(text: &str, names: &[&str]) -> String {
    to_f16_storage_with(text, names, &[])
}

/// An f16 tensor whose f32 value a pass keeps in a binding of its own between dispatches
/// (the dense forward's partial O between key chunks, the dense backward's partial gradients
/// between parts; see the module's doc).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeptPartial {
    /// The f16 tensor's WGSL name (one of the rewrite's names).
    pub of: &'static str,
    /// The f32 binding's WGSL name.
    pub name: &'static str,
    /// Its binding number in group 0.
    pub binding: u32,
    /// The WGSL condition under which a store of `of` keeps its f32 value too.
    pub keep: &'static str,
}

/// The dense forward's partial O (`passes::f16_only_bindings`): kept while keys remain after
/// the dispatch's chunk (`params.n_kv`: a variable-length batch's executor sets it to its
/// longest sequence's keys, which its chunks cover).
pub(crate) const DENSE_PARTIAL: KeptPartial = KeptPartial {
    of: "out",
    name: "out_partial",
    binding: 8,
    keep: "params.key_hi < params.n_kv",
};

/// The f16 variant's kept partial for `b`, one of `passes::f16_only_bindings`: the tensor it
/// holds the f32 sums of and the condition for keeping them. dQ sums over key parts
/// (`[key_lo, key_hi)`, kept while keys remain: `params.n_kv`, the longest sequence's keys in
/// a variable-length batch, as O's); dK and dV over query parts (`[chunk_lo, chunk_hi)` of each
/// query head, kept while queries remain: `params.n`, the longest sequence's queries in a
/// variable-length batch, set so by the executor; its problems read their lengths from the
/// sequence table, never `params.n`).
pub(crate) fn kept_partial(b: &crate::gpu::engine::passes::Binding) -> KeptPartial {
    let (of, keep) = match b.role {
        Role::DQPartial => ("dq", "params.key_hi < params.n_kv"),
        Role::DKPartial => ("dk", "params.chunk_hi < params.n"),
        Role::DVPartial => ("dv", "params.chunk_hi < params.n"),
        // Role::OutPartial, the only other f16-only binding (the descriptor tests check the
        // declared names against every pass's bindings).
        _ => (DENSE_PARTIAL.of, DENSE_PARTIAL.keep),
    };
    KeptPartial {
        of,
        name: b.name,
        binding: b.binding,
        keep,
    }
}

/// Every kept partial of `pass`'s f16 variant ([`kept_partial`] of each
/// `passes::f16_only_bindings`).
pub(crate) fn kept_partials(pass: Pass) -> Vec<KeptPartial> {
    crate::gpu::engine::passes::f16_only_bindings(pass)
        .iter()
        .map(kept_partial)
        .collect()
}

/// [`to_f16_storage`], and for each of `partials` the tensor `of` read from its f32 binding
/// and kept there by every store while `keep` holds (the module's doc).
pub(crate) fn to_f16_storage_with(text: &str, names: &[&str], partials: &[KeptPartial]) -> String {
    if names.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 1024);
    out.push_str(F16_DIRECTIVE);
    for line in text.lines() {
        // Comments (markers included) are left as they are.
        let (code, comment) = match line.find("//") {
            Some(at) => line.split_at(at),
            None => (line, ""),
        };
        let decl = declared(code, names);
        match &decl {
            Some((decl, _)) => out.push_str(decl),
            None => out.push_str(&rewrite(code, (names, partials), line)),
        }
        out.push_str(comment);
        out.push('\n');
        if let Some((_, name)) = &decl {
            for p in partials.iter().filter(|p| p.of == *name) {
                out.push_str(&format!(
                    "@group(0) @binding({}) var<storage, read_write> {}: array<f32>; \
                     // {}'s f32 partial between dispatches\n",
                    p.binding, p.name, p.of
                ));
            }
        }
    }
    out
}

/// A storage binding's declaration of one of `names` with its `array<f32>` made f16, and the
/// name.
fn declared<'n>(code: &str, names: &[&'n str]) -> Option<(String, &'n str)> {
    let at = code.find("var<storage")?;
    let rest = &code[at..];
    let name = rest[rest.find('>')? + 1..rest.find(':')?].trim();
    let name = *names.iter().find(|&&x| x == name)?;
    assert!(
        code.contains("array<f32>"),
        "f16 storage: `{code}` is not an array<f32>"
    );
    Some((code.replacen("array<f32>", "array<f16>", 1), name))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// `code` with each access `name[..]` of `names` converted: a load becomes `f32(name[..])`, a
/// store `name[..] = x;` becomes `name[..] = f16(x);`. With `partial`, a load of its tensor
/// reads the f32 binding instead, and a store keeps the f32 value there too while its
/// condition holds. `line` names the source in a panic.
fn rewrite(code: &str, (names, partials): (&[&str], &[KeptPartial]), line: &str) -> String {
    let b = code.as_bytes();
    let mut out = String::with_capacity(code.len() + 16);
    let mut i = 0;
    while i < b.len() {
        let starts = is_ident(b[i]) && (i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b'.'));
        if !starts {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let mut end = i;
        while end < b.len() && is_ident(b[end]) {
            end += 1;
        }
        let ident = &code[i..end];
        if !(names.contains(&ident) && b.get(end) == Some(&b'[')) {
            out.push_str(ident);
            i = end;
            continue;
        }
        let close = closing(code, end, b'[', b']')
            .unwrap_or_else(|| panic!("f16 storage: an index of `{ident}` spans lines: {line}"));
        let index = rewrite(&code[end + 1..close], (names, partials), line);
        let access = format!("{ident}[{index}]");
        let kept = partials.iter().find(|p| p.of == ident);
        let after = code[close + 1..].trim_start();
        let ab = after.as_bytes();
        if ab.first() == Some(&b'=') && ab.get(1) != Some(&b'=') {
            let semi = after
                .find(';')
                .unwrap_or_else(|| panic!("f16 storage: a store spans lines: {line}"));
            let value = rewrite(after[1..semi].trim(), (names, partials), line);
            match kept {
                None => {
                    out.push_str(&format!("{access} = f16({value})"));
                    out.push_str(&after[semi..]);
                }
                Some(p) => {
                    out.push_str(&format!(
                        "{{ let kept = {value}; {access} = f16(kept); if ({}) {{ {}[{index}] = \
                         kept; }} }}",
                        p.keep, p.name
                    ));
                    out.push_str(&after[semi + 1..]);
                }
            }
            return out;
        }
        let compound = ab.len() >= 2 && b"+-*/%&|^".contains(&ab[0]) && ab[1] == b'=';
        assert!(
            !compound,
            "f16 storage: a compound assignment to `{ident}`: {line}"
        );
        match kept {
            Some(p) => out.push_str(&format!("{}[{index}]", p.name)),
            None => out.push_str(&format!("f32({access})")),
        }
        i = close + 1;
    }
    out
}

/// The index of the bracket closing the one at `open` (`code[open] == o`), on this line.
fn closing(code: &str, open: usize, o: u8, c: u8) -> Option<usize> {
    let mut depth = 0i32;
    for (j, &x) in code.as_bytes().iter().enumerate().skip(open) {
        if x == o {
            depth += 1;
        } else if x == c {
            depth -= 1;
            if depth == 0 {
                return Some(j);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_stores_are_converted_and_the_rest_kept() {
        let src = "@group(0) @binding(1) var<storage, read> q: array<f32>;   // (bh, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;
fn f() {
    x[e] = q[head + i * d + c]; // q[0] in a comment
    out[base + c] = acc * q[idx[2]];
    var s = coarse_k[3] + myq[1] + a.q[0];
    out[row] = 0.0;
}
";
        let got = to_f16_storage(src, &["q", "out"]);
        let want = "enable f16;
@group(0) @binding(1) var<storage, read> q: array<f16>;   // (bh, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;
fn f() {
    x[e] = f32(q[head + i * d + c]); // q[0] in a comment
    out[base + c] = f16(acc * f32(q[idx[2]]));
    var s = coarse_k[3] + myq[1] + a.q[0];
    out[row] = f16(0.0);
}
";
        assert_eq!(got, want);
        assert_eq!(to_f16_storage(src, &[]), src);
    }

    /// The dense forward's partial: O's load reads the f32 binding, O's store rounds once and
    /// keeps the f32 value while keys remain; the binding is declared after O's.
    #[test]
    fn a_kept_partial_is_read_and_kept_in_f32() {
        let src = "@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // O
fn f() {
    x[e] = out[head + i * d + c];
    out[head + i * d + c] = x[e]; // store
}
";
        let got = to_f16_storage_with(src, &["out"], &[DENSE_PARTIAL]);
        let want = "enable f16;
@group(0) @binding(6) var<storage, read_write> out: array<f16>;    // O
@group(0) @binding(8) var<storage, read_write> out_partial: array<f32>; // out's f32 partial between dispatches
fn f() {
    x[e] = out_partial[head + i * d + c];
    { let kept = x[e]; out[head + i * d + c] = f16(kept); if (params.key_hi < params.n_kv) { out_partial[head + i * d + c] = kept; } } // store
}
";
        assert_eq!(got, want);
    }

    #[test]
    #[should_panic(expected = "compound assignment")]
    fn a_compound_assignment_is_refused() {
        to_f16_storage("    out[i] += 1.0;\n", &["out"]);
    }
}
