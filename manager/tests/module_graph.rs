//! The manager's dependency rule, checked over its own sources
//! (docs/architecture.md, "The rule"): no import cycle between its
//! top-level modules, and only `http` (and the app assembly in `lib.rs`)
//! knows HTTP status codes.
//!
//! The graph is read with `syn`: every `crate::…` path and `use crate::…`
//! tree in `src/<module>.rs` or `src/<module>/**.rs` is an edge from
//! `<module>` to the top-level module it names; an item named at the root
//! (`crate::SharedState`) is an edge to `lib`, unless `lib.rs` re-exports
//! it from a module (`pub use error::ApiError`), when it is an edge to that
//! module; `lib.rs` itself reaches every module it declares. `main.rs` is
//! the binary, a separate crate, and is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

fn src() -> PathBuf {
    crate_dir().join("src")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The first segments after `crate` of every path that starts with it.
#[derive(Default)]
struct CratePaths(BTreeSet<String>);

impl CratePaths {
    fn tree(&mut self, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Name(n) => {
                self.0.insert(n.ident.to_string());
            }
            syn::UseTree::Rename(r) => {
                self.0.insert(r.ident.to_string());
            }
            syn::UseTree::Path(p) => {
                self.0.insert(p.ident.to_string());
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.tree(t)),
            syn::UseTree::Glob(_) => {}
        }
    }
}

impl<'a> Visit<'a> for CratePaths {
    fn visit_item_use(&mut self, u: &'a syn::ItemUse) {
        if let syn::UseTree::Path(p) = &u.tree {
            if p.ident == "crate" {
                self.tree(&p.tree);
            }
        }
    }

    fn visit_path(&mut self, path: &'a syn::Path) {
        let mut segs = path.segments.iter();
        if let (Some(first), Some(second)) = (segs.next(), segs.next()) {
            if first.ident == "crate" {
                self.0.insert(second.ident.to_string());
            }
        }
        syn::visit::visit_path(self, path);
    }
}

/// Module → the modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let lib = syn::parse_file(&std::fs::read_to_string(src().join("lib.rs")).unwrap()).unwrap();
    let mut modules = BTreeSet::new();
    // Root re-exports: item name → the module it comes from.
    let mut reexports = BTreeMap::new();
    for item in &lib.items {
        match item {
            syn::Item::Mod(m) => {
                modules.insert(m.ident.to_string());
            }
            syn::Item::Use(u) => {
                // `pub use ::media;`: another crate, no edge inside this one.
                if let syn::UseTree::Name(n) = &u.tree {
                    reexports.insert(n.ident.to_string(), String::new());
                }
                if let syn::UseTree::Path(p) = &u.tree {
                    let from = p.ident.to_string();
                    let mut names = CratePaths::default();
                    names.tree(&p.tree);
                    for n in names.0 {
                        reexports.insert(n, from.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // `lib.rs` assembles the app: it reaches every module it declares
    // (by relative paths, which the visitor below does not see).
    g.insert("lib".into(), modules.clone());
    for f in files {
        let module = module_of(&f);
        if module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut v = CratePaths::default();
        v.visit_file(&file);
        let deps = g.entry(module.clone()).or_default();
        for name in v.0 {
            let to = if modules.contains(&name) {
                name
            } else if let Some(m) = reexports.get(&name) {
                m.clone()
            } else {
                "lib".to_string()
            };
            // Edges only to modules of this crate (a root re-export of
            // another crate's item is no edge).
            if to != module && (modules.contains(&to) || to == "lib") {
                deps.insert(to);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[w].min(self.low[v]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.index[w].min(self.low[v]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut c = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on.remove(w);
                    c.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if c.len() > 1 {
                    c.sort();
                    self.out.push(c);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    };
    edge(&mut g, "http", "ledger");
    edge(&mut g, "ledger", "catalog");
    assert!(cycles(&g).is_empty());
    edge(&mut g, "catalog", "http");
    assert_eq!(cycles(&g), vec![vec!["catalog", "http", "ledger"]]);
}

#[test]
fn the_manager_has_no_module_cycle() {
    let g = graph();
    assert!(g.len() > 10, "read the sources: {g:?}");
    let found = cycles(&g);
    let mut why = String::new();
    for c in &found {
        why += &format!("cycle among {c:?}:\n");
        for m in c {
            let inside: Vec<_> = g[m].iter().filter(|d| c.contains(d)).collect();
            why += &format!("  {m} uses {inside:?}\n");
        }
    }
    assert!(found.is_empty(), "{why}");
}

/// Only the HTTP layer (and the app assembly) answers HTTP: nothing else
/// builds a response, extracts a request or names a status code of ours.
/// (Reading a node's answer through `reqwest` is a client, and allowed.)
#[test]
fn only_http_knows_status_codes() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    for f in files {
        let module = module_of(&f);
        if module == "http" || module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for needle in [
            "IntoResponse",
            "axum::response",
            "axum::extract",
            "axum::http::StatusCode",
            "http::StatusCode",
            "ApiError",
        ] {
            if text.contains(needle) {
                found.push(format!("{}: {needle}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "outside `http`: {found:#?}");
}

/// A file's text before its unit tests (which may look at rows directly).
fn product_code(text: &str) -> String {
    text.split("#[cfg(test)]").next().unwrap_or("").to_string()
}

/// Every SQL statement lives in a catalog backend (`catalog/sqlite.rs`,
/// `catalog/postgres.rs`, and `catalog/portable.rs`, which both expand).
/// Not in the trait's module, not in its
/// conformance suite (which must run unchanged on every backend), and
/// nowhere else.
#[test]
fn sql_stays_in_the_catalog() {
    const BACKENDS: [&str; 3] = [
        "catalog/sqlite.rs",
        "catalog/postgres.rs",
        "catalog/portable.rs",
    ];
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    let mut in_backends = 0;
    for f in files {
        let rel = f
            .strip_prefix(src())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = product_code(&std::fs::read_to_string(&f).unwrap());
        for needle in ["sqlx::query", "query_as(", "begin_with("] {
            if text.contains(needle) {
                if BACKENDS.contains(&rel.as_str()) {
                    in_backends += 1;
                } else {
                    found.push(format!("{}: {needle}", f.display()));
                }
            }
        }
    }
    assert!(in_backends > 0, "the backends were not found: {BACKENDS:?}");
    assert!(found.is_empty(), "SQL outside the catalog: {found:#?}");
}

/// This crate's folder, as `cargo test` gives it when the test runs. The
/// compile-time value is only a fallback: a build folder shared by two
/// checkouts may hand one of them a binary compiled in the other.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
