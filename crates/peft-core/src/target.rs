//! Which modules an adapter targets, with Hugging Face peft's matching rules.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// Target modules as peft spells them in `target_modules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A regular expression that must match the whole module path, or `all-linear`.
    Pattern(String),
    /// Exact module names or dotted suffixes of module paths (`query` matches `...self.query`).
    Names(Vec<String>),
}

/// The layer-name patterns peft tries when `layers_to_transform` is set without `layers_pattern`.
const COMMON_LAYERS_PATTERNS: [&str; 5] = ["layers", "h", "block", "blocks", "layer"];

/// Compiled matching rules: target modules plus an optional layer selection.
#[derive(Clone, Debug)]
pub struct TargetMatcher {
    targets: CompiledTargets,
    layers: Option<(Vec<usize>, Vec<Regex>)>,
}

#[derive(Clone, Debug)]
enum CompiledTargets {
    Regex(Regex),
    Names(Vec<String>),
    AllLinear,
}

impl TargetMatcher {
    /// Compiles `targets`; `layers_to_transform` restricts matches to those layer indices, found
    /// in the path after one of `layers_pattern` (peft's defaults when empty).
    pub fn new(
        targets: &TargetModules,
        layers_to_transform: Option<&[usize]>,
        layers_pattern: &[String],
    ) -> Result<Self> {
        let targets = match targets {
            TargetModules::Pattern(p) if p == "all-linear" => CompiledTargets::AllLinear,
            TargetModules::Pattern(p) => {
                CompiledTargets::Regex(full_match_regex(p, "target_modules")?)
            }
            TargetModules::Names(names) => CompiledTargets::Names(names.clone()),
        };
        let layers = match layers_to_transform {
            None => None,
            Some(indices) => {
                let patterns: Vec<String> = if layers_pattern.is_empty() {
                    COMMON_LAYERS_PATTERNS
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                } else {
                    layers_pattern.to_vec()
                };
                let regexes = patterns
                    .iter()
                    .map(|p| {
                        Regex::new(&format!(r"^.*\.{}\.(\d+)\.", regex::escape(p))).map_err(|e| {
                            PeftError::Config {
                                key: "layers_pattern".into(),
                                message: e.to_string(),
                            }
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some((indices.to_vec(), regexes))
            }
        };
        Ok(Self { targets, layers })
    }

    /// Whether the embedding or convolution at `path` is targeted: as in peft, `all-linear`
    /// never matches one.
    pub fn matches_non_linear(&self, path: &str) -> bool {
        !matches!(self.targets, CompiledTargets::AllLinear) && self.matches(path, false)
    }

    /// Whether the linear module at `path` is targeted. `is_output_head` excludes the task head from
    /// `all-linear`, as peft does.
    pub fn matches(&self, path: &str, is_output_head: bool) -> bool {
        let hit = match &self.targets {
            CompiledTargets::AllLinear => !is_output_head,
            CompiledTargets::Regex(re) => re.is_match(path),
            CompiledTargets::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        };
        hit && self.layer_selected(path)
    }

    fn layer_selected(&self, path: &str) -> bool {
        let Some((indices, patterns)) = &self.layers else {
            return true;
        };
        patterns
            .iter()
            .find_map(|re| re.captures(path))
            .and_then(|c| c[1].parse::<usize>().ok())
            .is_some_and(|i| indices.contains(&i))
    }
}

/// Compiles `pattern` so that it must match a whole string (Python's `re.fullmatch`).
pub fn full_match_regex(pattern: &str, key: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PeftError::Config {
        key: key.into(),
        message: format!("`{pattern}` is not a valid regular expression: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q0: &str = "bert.encoder.layer.0.attention.self.query";
    const V3: &str = "bert.encoder.layer.3.attention.self.value";
    const OUT: &str = "bert.encoder.layer.0.attention.output.dense";

    fn names(n: &[&str]) -> TargetModules {
        TargetModules::Names(n.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn list_matches_exact_names_and_dotted_suffixes() {
        let m = TargetMatcher::new(&names(&["query", "value"]), None, &[]).unwrap();
        assert!(m.matches(Q0, false) && m.matches(V3, false));
        assert!(!m.matches(OUT, false));
        let m = TargetMatcher::new(&names(&["self.query"]), None, &[]).unwrap();
        assert!(m.matches(Q0, false));
        // A suffix must start at a dot: `uery` is no module name.
        let m = TargetMatcher::new(&names(&["uery"]), None, &[]).unwrap();
        assert!(!m.matches(Q0, false));
    }

    #[test]
    fn string_is_a_full_match_regex() {
        let m = TargetMatcher::new(
            &TargetModules::Pattern(r".*\.(query|value)".into()),
            None,
            &[],
        )
        .unwrap();
        assert!(m.matches(Q0, false) && m.matches(V3, false) && !m.matches(OUT, false));
        // Not a search: `query` alone does not match the longer path.
        let m = TargetMatcher::new(&TargetModules::Pattern("query".into()), None, &[]).unwrap();
        assert!(!m.matches(Q0, false));
    }

    #[test]
    fn all_linear_skips_the_output_head() {
        let m =
            TargetMatcher::new(&TargetModules::Pattern("all-linear".into()), None, &[]).unwrap();
        assert!(m.matches(OUT, false) && !m.matches("classifier", true));
    }

    #[test]
    fn layers_to_transform_selects_layer_indices() {
        let m = TargetMatcher::new(&names(&["query", "value"]), Some(&[3, 4]), &[]).unwrap();
        assert!(!m.matches(Q0, false) && m.matches(V3, false));
        let m = TargetMatcher::new(&names(&["query"]), Some(&[0]), &["blocks".into()]).unwrap();
        assert!(
            !m.matches(Q0, false),
            "pattern `blocks` does not occur in a BERT path"
        );
    }

    #[test]
    fn invalid_regex_names_the_key() {
        let err =
            TargetMatcher::new(&TargetModules::Pattern("(query".into()), None, &[]).unwrap_err();
        assert!(err.to_string().contains("target_modules"), "{err}");
    }
}
