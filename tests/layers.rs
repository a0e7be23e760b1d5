//! The import rules of docs/architecture.md, checked on the source text: each layer imports only
//! layers below it, and no two modules import each other. A `use` that breaks a rule fails here
//! with the file and the line, before it becomes a cycle someone has to untangle.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The crate paths a file refers to (`crate::a::b`, and `super::x` resolved against the file's
/// own module path), with the line they are on.
fn references(src: &Path, file: &Path) -> Vec<(String, usize)> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut module: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if module.last().is_some_and(|m| m == "mod" || m == "lib") {
        module.pop();
    }
    let text = fs::read_to_string(file).expect("readable");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let path: String = rest[at + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push((path.trim_end_matches(':').to_string(), i + 1));
            rest = &rest[at + 7..];
        }
        if let Some(at) = code.find("use super::") {
            // `super` of a file module is its parent module.
            let parent = &module[..module.len().saturating_sub(1)];
            let tail: String = code[at + 11..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut p = parent.join("::");
            if !p.is_empty() {
                p.push_str("::");
            }
            p.push_str(tail.trim_end_matches(':'));
            out.push((p, i + 1));
        }
    }
    out
}

/// The layer of a module path (its first components decide).
fn layer(path: &str) -> &'static str {
    let parts: Vec<&str> = path.split("::").collect();
    match parts.as_slice() {
        ["gpu", "engine", ..] => "engine",
        ["gpu", "fma", ..] => "fma",
        ["gpu", "dense", ..] => "dense",
        ["gpu", "decode", ..] => "decode",
        ["gpu", ..] => "gpu front",
        ["plan", ..] => "plan",
        ["cpu", ..] => "cpu",
        ["conformance", ..] | ["bin", ..] => "front",
        _ => "leaf",
    }
}

/// Which layers a layer may import (besides itself).
fn allowed(from: &str) -> &'static [&'static str] {
    match from {
        "leaf" => &["leaf"],
        "cpu" => &["leaf"],
        "plan" => &["leaf"],
        "engine" => &["leaf", "plan"],
        "fma" | "dense" => &["leaf", "plan", "engine"],
        // The decoder runs the executors' forwards for a prefill, as any caller would.
        "decode" => &["leaf", "plan", "engine", "fma", "dense"],
        _ => &[
            "leaf",
            "cpu",
            "plan",
            "engine",
            "fma",
            "dense",
            "decode",
            "gpu front",
        ],
    }
}

#[test]
fn layers_import_only_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap().with_extension("");
        let own = rel.to_string_lossy().replace('/', "::");
        let from = layer(&own);
        for (path, line) in references(&src, &file) {
            let to = layer(&path);
            // `gpu front` is gpu/mod.rs, the public re-exports: it may name every gpu module,
            // and nothing below it imports it.
            let ok = to == from
                || allowed(from).contains(&to)
                || (from == "gpu front" && path.starts_with("gpu"));
            if !ok {
                broken.push(format!(
                    "{}:{line}: {from} imports {to} ({path})",
                    rel.display()
                ));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn no_two_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // Module -> the modules (files) it imports, at file granularity.
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let files: Vec<_> = rust_files(&src);
    let modules: Vec<String> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(&src).unwrap().with_extension("");
            let s = rel.to_string_lossy().replace('/', "::");
            s.trim_end_matches("::mod").to_string()
        })
        .collect();
    for (file, own) in files.iter().zip(&modules) {
        for (path, _) in references(&src, file) {
            // The longest module that prefixes the path is the file it refers to.
            if let Some(target) = modules
                .iter()
                .filter(|m| path == **m || path.starts_with(&format!("{m}::")))
                .max_by_key(|m| m.len())
            {
                if target != own && !own.starts_with(&format!("{target}::")) {
                    graph.entry(own.clone()).or_default().push(target.clone());
                }
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, targets) in &graph {
        for b in targets {
            if graph.get(b).is_some_and(|t| t.contains(a)) && a < b {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other:\n{}",
        cycles.join("\n")
    );
}

/// Every file under `dir` (recursively), relative to `root`, skipping build outputs and
/// installed packages.
fn all_files(root: &Path, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if ["node_modules", "pkg", "target", "results"].contains(&name.as_ref())
            || name.starts_with('.')
        {
            continue;
        }
        if path.is_dir() {
            out.extend(all_files(root, &path));
        } else {
            let rel = path.strip_prefix(root).expect("under the root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    out
}

/// docs/architecture.md's directory index names every file of the code, shaders, tests,
/// examples, scripts and the web front: a file nobody describes is a file nobody finds.
#[test]
fn the_directory_index_names_every_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = fs::read_to_string(root.join("docs/architecture.md")).expect("architecture.md");
    let index = doc
        .split("## Directory index")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a '## Directory index' section");
    let mut missing = Vec::new();
    for dir in ["src", "shaders", "tests", "examples", "scripts", "web"] {
        for file in all_files(root, &root.join(dir)) {
            if file.ends_with("package-lock.json") {
                continue;
            }
            let (folder, name) = file.rsplit_once('/').unwrap_or(("", &file));
            let listed =
                index.contains(&format!("**{folder}/**")) && index.contains(&format!("`{name}`"));
            if !listed {
                missing.push(file);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md's directory index lacks {missing:?}: add a line for each"
    );
}
