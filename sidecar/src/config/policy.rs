//! `[policy]`: per-service overrides of the traffic policy, as written in the config file
//! (the registry's `policy/` documents use the same override type).

use std::collections::{BTreeMap, HashMap};

use detour_proto::ServiceName;
use detour_registry::policy::PolicyOverride;
use serde::Deserialize;

/// `[policy]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRaw {
    /// `[policy.service.NAME]`: one service's overrides.
    pub service: BTreeMap<String, PolicyOverride>,
}

impl PolicyRaw {
    /// The overrides by service, every problem pushed to `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> HashMap<ServiceName, PolicyOverride> {
        let mut out = HashMap::new();
        for (name, o) in &self.service {
            let key = format!("policy.service.{name}");
            match ServiceName::new(name.clone()) {
                Ok(s) => {
                    let problems = o.problems(&key);
                    if problems.is_empty() {
                        out.insert(s, o.clone());
                    }
                    p.extend(problems);
                }
                Err(e) => p.push(format!("{key}: {e}")),
            }
        }
        out
    }
}
