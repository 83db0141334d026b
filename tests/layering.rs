//! The crate's layers go one way (lib.rs): domain modules (`bdev`, `vhost`, `nbd`,
//! `localpool`, `rbd`, `reactor`) never refer to the application (`app`) or the RPC layer
//! (`rpc`) except in their `rpc.rs` files, and no import circle spans more than two files.
//!
//! The import graph is read from the sources: every `use` (groups expanded) and every
//! `crate::`/`super::`/`self::`/`blockd::` path, resolved to the file of the longest module
//! prefix it names. Comments and string literals are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module directories whose files (except `rpc.rs`) must not refer to `app` or `rpc`.
const DOMAIN: &[&str] = &["bdev/", "vhost/", "nbd/", "localpool/", "rbd/", "reactor/"];

/// Largest import circle tolerated (two files that know each other).
const MAX_CIRCLE: usize = 2;

/// Every `.rs` file under `dir`, by path relative to `dir` (with `/`).
fn read_sources(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The module path of a file (`bdev/aio/mod.rs` → `[bdev, aio]`); `None` for binaries.
fn module_path(rel: &str) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    Some(parts)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The source without comments and without the contents of string and char literals.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r'
            && (i == 0 || !is_ident(c[i - 1]))
            && matches!(next, Some('"') | Some('#'))
        {
            // A raw string r"..." or r#"..."#: skip to the quote and as many hashes.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')))
            {
                j += 1;
            }
            i = j + 1 + hashes;
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}', '"') is skipped; a lifetime is kept.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                out.push(c[i]);
                i += 1;
            }
            out.push(' ');
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e` (no whitespace, renames dropped).
fn expand_use(body: &str) -> Vec<String> {
    let Some(open) = body.find('{') else {
        return vec![body.to_string()];
    };
    let Some(close) = body.rfind('}') else {
        return vec![body.to_string()];
    };
    let (prefix, inner) = (&body[..open], &body[open + 1..close]);
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|it| !it.is_empty())
        .flat_map(|it| expand_use(it).into_iter().map(|e| format!("{prefix}{e}")))
        .collect()
}

/// Every path of `code` that may name a module of the crate: the bodies of `use` items,
/// and `crate::`/`super::`/`blockd::` paths anywhere.
fn paths_in(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let text: String = bytes.iter().collect();
    // `use` items.
    let mut from = 0;
    while let Some(pos) = text[from..].find("use ") {
        let at = from + pos;
        from = at + 4;
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let Some(end) = text[at..].find(';') else {
            break;
        };
        let words: Vec<&str> = text[at + 4..at + end].split_whitespace().collect();
        // Drop renames (`x as y`), then all whitespace.
        let mut body = String::new();
        let mut k = 0;
        while k < words.len() {
            if words[k] == "as" {
                k += 2;
                continue;
            }
            body.push_str(words[k]);
            k += 1;
        }
        out.extend(expand_use(&body));
    }
    // Paths anywhere.
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':');
        let rest: String = bytes[i..bytes.len().min(i + 8)].iter().collect();
        let head = ["crate::", "super::", "blockd::"]
            .into_iter()
            .find(|h| rest.starts_with(h));
        if let (true, Some(_)) = (boundary, head) {
            let mut j = i;
            while j < bytes.len() && (is_ident(bytes[j]) || bytes[j] == ':') {
                j += 1;
            }
            let p: String = bytes[i..j].iter().collect();
            let p = p.trim_end_matches(':');
            if p.contains("::") {
                out.push(p.to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The import graph of `files`: file → the other files it refers to.
fn import_graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_module: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for rel in files.keys() {
        if let Some(m) = module_path(rel) {
            by_module.insert(m, rel.clone());
        }
    }
    let resolve = |parts: &[String]| {
        (0..=parts.len())
            .rev()
            .find_map(|n| by_module.get(&parts[..n]).cloned())
    };
    let mut graph = BTreeMap::new();
    for (rel, text) in files {
        let here = module_path(rel).unwrap_or_default();
        let mut targets = BTreeSet::new();
        for p in paths_in(&code_only(text)) {
            let mut parts: Vec<String> = p.split("::").map(String::from).collect();
            let mut base: Vec<String> = match parts[0].as_str() {
                "crate" | "blockd" => Vec::new(),
                "super" => here[..here.len().saturating_sub(1)].to_vec(),
                "self" => here.clone(),
                _ => continue,
            };
            parts.remove(0);
            while parts.first().is_some_and(|p| p == "super") {
                base.pop();
                parts.remove(0);
            }
            base.extend(parts);
            if let Some(f) = resolve(&base) {
                if &f != rel {
                    targets.insert(f);
                }
            }
        }
        graph.insert(rel.clone(), targets);
    }
    graph
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let lw = self.low[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w.as_str()) {
                    let iw = self.index[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// `(domain file, app/rpc file it refers to)` for every reference the layering forbids.
fn domain_violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let upper = |f: &str| f == "app.rs" || f.starts_with("app/") || f.starts_with("rpc/");
    graph
        .iter()
        .filter(|(f, _)| DOMAIN.iter().any(|d| f.starts_with(d)))
        .filter(|(f, _)| !f.ends_with("/rpc.rs"))
        .flat_map(|(f, t)| {
            t.iter()
                .filter(|t| upper(t))
                .map(move |t| (f.clone(), t.clone()))
        })
        .collect()
}

fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = read_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        files.len() > 50 && files.contains_key("lib.rs"),
        "src/ not read"
    );
    import_graph(&files)
}

#[test]
fn domain_modules_never_refer_to_the_app_or_the_rpc_layer() {
    let bad = domain_violations(&crate_graph());
    assert!(
        bad.is_empty(),
        "domain files referring to app/rpc (only a module's rpc.rs may): {bad:?}"
    );
}

#[test]
fn no_import_circle_spans_more_than_two_files() {
    let big: Vec<Vec<String>> = circles(&crate_graph())
        .into_iter()
        .filter(|c| c.len() > MAX_CIRCLE)
        .collect();
    assert!(
        big.is_empty(),
        "import circles of more than {MAX_CIRCLE} files: {big:?}"
    );
}

/// The checker itself finds what the two tests above look for, on a made-up crate.
#[test]
fn the_checker_sees_groups_super_self_and_circles() {
    let files: BTreeMap<String, String> = [
        (
            "lib.rs",
            "pub mod app; pub mod rpc; pub mod bdev; pub mod vhost;",
        ),
        (
            "app.rs",
            "use crate::{bdev::BdevRegistry, rpc::RpcMethods};",
        ),
        (
            "rpc/mod.rs",
            "// use crate::app::App;\nconst S: &str = \"crate::app\";",
        ),
        (
            "bdev/mod.rs",
            "pub mod registry; pub mod rpc;\nuse self::registry::R;",
        ),
        (
            "bdev/registry.rs",
            "use super::super::vhost as v; fn f() { crate::rpc::code(); }",
        ),
        ("bdev/rpc.rs", "use crate::rpc::{self, RpcError};"),
        (
            "vhost/mod.rs",
            "pub mod blk;\nuse crate::bdev::{\n    Bdev,\n};",
        ),
        (
            "vhost/blk.rs",
            "use blockd::app::App; fn g<'a>(x: &'a u8) -> char { '\"' }",
        ),
    ]
    .into_iter()
    .map(|(f, t)| (f.to_string(), t.to_string()))
    .collect();
    let g = import_graph(&files);
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(g["app.rs"], set(&["bdev/mod.rs", "rpc/mod.rs"]));
    assert_eq!(
        g["rpc/mod.rs"],
        set(&[]),
        "comments and strings are not imports"
    );
    assert_eq!(g["bdev/mod.rs"], set(&["bdev/registry.rs"]));
    assert_eq!(g["bdev/registry.rs"], set(&["vhost/mod.rs", "rpc/mod.rs"]));
    assert_eq!(g["vhost/blk.rs"], set(&["app.rs"]));
    let mut bad = domain_violations(&g);
    bad.sort();
    assert_eq!(
        bad,
        [
            ("bdev/registry.rs".to_string(), "rpc/mod.rs".to_string()),
            ("vhost/blk.rs".to_string(), "app.rs".to_string()),
        ],
        "bdev/rpc.rs may use the rpc layer"
    );
    // bdev/mod.rs → registry → vhost/mod.rs → bdev/mod.rs: three files.
    assert_eq!(
        circles(&g),
        [vec![
            "bdev/mod.rs".to_string(),
            "bdev/registry.rs".to_string(),
            "vhost/mod.rs".to_string()
        ]]
    );
}
