//! The crate's `rust-version` is honest: no dependency it builds (normal and build
//! dependencies, default features and all features, every target platform) declares a newer
//! one in the resolved tree (`Cargo.lock`). Development dependencies are not checked: users
//! never build them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;

use serde_json::Value;

/// A `rust-version` as numbers, `1.88` or `1.88.1`; a missing patch counts as 0.
fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text
        .split('.')
        .map(|part| {
            part.parse()
                .unwrap_or_else(|_| panic!("unreadable rust-version {text:?}"))
        })
        .collect();
    parts.resize(3, 0);
    parts
}

/// `cargo metadata` for the crate with `features` (extra arguments).
fn metadata(features: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(features)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// Every package the crate builds with `features`, reached from the crate by normal and build
/// dependency edges: `(name version, rust-version)`.
fn built_packages(features: &[&str]) -> Vec<(String, Option<String>)> {
    let metadata = metadata(features);
    let packages: HashMap<&str, &Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let resolve = &metadata["resolve"];
    let nodes: HashMap<&str, &Value> = resolve["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let mut seen = HashSet::new();
    let mut stack = vec![resolve["root"].as_str().expect("a root package")];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let built = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|kind| kind["kind"].as_str() != Some("dev"));
            if built {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    seen.into_iter()
        .map(|id| {
            let package = packages[id];
            let name = format!("{} {}", package["name"], package["version"]).replace('"', "");
            let rust_version = package["rust_version"].as_str().map(str::to_owned);
            (name, rust_version)
        })
        .collect()
}

#[test]
fn no_dependency_needs_a_newer_rust_than_rust_version() {
    let ours = env!("CARGO_PKG_RUST_VERSION");
    assert!(!ours.is_empty(), "Cargo.toml sets rust-version");
    let mut too_new = BTreeSet::new();
    for features in [&[][..], &["--all-features"][..]] {
        let packages = built_packages(features);
        assert!(
            packages.len() > 10,
            "the walk found the dependencies: {packages:?}"
        );
        for (package, rust_version) in packages {
            if let Some(theirs) = rust_version.filter(|v| version(v) > version(ours)) {
                too_new.insert(format!("{package} needs Rust {theirs} ({features:?})"));
            }
        }
    }
    assert!(
        too_new.is_empty(),
        "rust-version is {ours}, but:\n  {}\nRaise rust-version, or pin these to versions that \
         build on {ours}.",
        too_new.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn versions_compare_numerically() {
    assert!(version("1.88") > version("1.87.1"));
    assert!(version("1.100") > version("1.99"));
    assert_eq!(version("1.88"), version("1.88.0"));
}
