//! Typed reads of a table's keys that report (and remember) every problem instead of stopping.

use super::{Loc, Node, Reporter, Val};

pub struct Keys<'a> {
    node: &'a Node,
    stage: Option<String>,
    what: String,
    rep: &'a mut Reporter,
    used: Vec<String>,
    finished: bool,
}

impl<'a> Keys<'a> {
    pub fn new(node: &'a Node, stage: Option<&str>, what: &str, rep: &'a mut Reporter) -> Keys<'a> {
        Keys { node, stage: stage.map(str::to_string), what: what.to_string(), rep, used: Vec::new(), finished: false }
    }

    pub fn stage(&self) -> Option<&str> {
        self.stage.as_deref()
    }

    pub fn reporter(&mut self) -> &mut Reporter {
        self.rep
    }

    pub fn has(&self, key: &str) -> bool {
        self.node.get(key).is_some()
    }

    pub fn at(&self, key: &str) -> Loc {
        self.node.key_loc(key)
    }

    /// Reports a problem with the value of `key`, at that value.
    pub fn error(&mut self, key: &str, msg: impl Into<String>) {
        let at = self.node.get(key).map(|n| n.at.clone()).unwrap_or_else(|| self.node.at.clone());
        let at = if matches!(at, Loc::Unknown) { self.at(key) } else { at };
        self.rep.error(&at, self.stage.as_deref(), msg);
    }

    /// Reports a missing required key, at the table.
    pub fn missing(&mut self, key: &str, what: &str) {
        let at = self.node.at.clone();
        self.rep.error(&at, self.stage.as_deref(), format!("missing `{key}` ({what})"));
    }

    pub fn node(&mut self, key: &str) -> Option<&'a Node> {
        self.used.push(key.to_string());
        self.node.get(key)
    }

    fn wrong(&mut self, key: &str, n: &Node, expected: &str) {
        let msg = format!("`{key}` must be {expected}, found {} {}", n.type_name(), n.show());
        let at = n.at.clone();
        self.rep.error(&at, self.stage.as_deref(), msg);
    }

    pub fn str(&mut self, key: &str) -> Option<String> {
        self.str_at(key).map(|(s, _)| s)
    }

    pub fn str_at(&mut self, key: &str) -> Option<(String, Loc)> {
        let n = self.node(key)?;
        match &n.val {
            Val::Str(s) => Some((s.clone(), n.at.clone())),
            _ => {
                self.wrong(key, n, "a string");
                None
            }
        }
    }

    /// `device`: "auto" (the default), "cpu" or "cuda"; anything else is reported (None).
    pub fn device(&mut self) -> Option<super::Device> {
        self.choice("device", super::Device::Auto)
    }

    /// One of a fixed set of names ([`lake::choice!`]): `default` when absent; an unknown name
    /// is reported with the choices (None).
    pub fn choice<T: std::str::FromStr<Err = String>>(&mut self, key: &str, default: T) -> Option<T> {
        let Some(name) = self.str(key) else {
            // Absent, or not a string (reported by `str`).
            return (!self.has(key)).then_some(default);
        };
        match name.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    /// The photo loader's `loader_threads` (default: the machine's cores) and `prefetch`
    /// (batches decoded ahead, default 4).
    pub fn loader(&mut self) -> (usize, usize) {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let threads = self.int("loader_threads", 1, 256).map(|n| n as usize).unwrap_or(cores);
        (threads, self.int("prefetch", 1, 64).unwrap_or(4) as usize)
    }

    pub fn bool(&mut self, key: &str) -> Option<bool> {
        let n = self.node(key)?;
        match n.val {
            Val::Bool(b) => Some(b),
            _ => {
                self.wrong(key, n, "true or false");
                None
            }
        }
    }

    /// An integer within `[min, max]`.
    pub fn int(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        let n = self.node(key)?;
        match n.val {
            Val::Int(i) if (min..=max).contains(&i) => Some(i),
            Val::Int(i) => {
                let msg = format!("`{key}` must be between {min} and {max}, found {i}");
                let at = n.at.clone();
                self.rep.error(&at, self.stage.as_deref(), msg);
                None
            }
            _ => {
                self.wrong(key, n, "an integer");
                None
            }
        }
    }

    /// A number (integers accepted) within `[min, max]`.
    pub fn float(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        let n = self.node(key)?;
        let v = match n.val {
            Val::Float(f) => f,
            Val::Int(i) => i as f64,
            _ => {
                self.wrong(key, n, "a number");
                return None;
            }
        };
        if !(min..=max).contains(&v) {
            let msg = format!("`{key}` must be between {min} and {max}, found {v}");
            let at = n.at.clone();
            self.rep.error(&at, self.stage.as_deref(), msg);
            return None;
        }
        Some(v)
    }

    /// A list of strings (a single string is taken as a list of one).
    pub fn str_list(&mut self, key: &str) -> Option<Vec<String>> {
        self.str_list_at(key).map(|v| v.into_iter().map(|(s, _)| s).collect())
    }

    pub fn str_list_at(&mut self, key: &str) -> Option<Vec<(String, Loc)>> {
        let n = self.node(key)?;
        match &n.val {
            Val::Str(s) => Some(vec![(s.clone(), n.at.clone())]),
            Val::Array(items) => {
                let mut out = Vec::new();
                for it in items {
                    match &it.val {
                        Val::Str(s) => out.push((s.clone(), it.at.clone())),
                        _ => self.wrong(key, it, "a list of strings; an item"),
                    }
                }
                Some(out)
            }
            _ => {
                self.wrong(key, n, "a list of strings");
                None
            }
        }
    }

    /// A table of string values (`{ aws_region = "eu-west-1" }`).
    pub fn str_map(&mut self, key: &str) -> Option<Vec<(String, String)>> {
        let n = self.node(key)?;
        let Some(entries) = n.as_table() else {
            self.wrong(key, n, "a table of strings");
            return None;
        };
        let mut out = Vec::new();
        for (k, _, v) in entries {
            match &v.val {
                Val::Str(s) => out.push((k.clone(), s.clone())),
                Val::Int(_) | Val::Float(_) | Val::Bool(_) => out.push((k.clone(), v.show())),
                _ => self.wrong(&format!("{key}.{k}"), v, "a string"),
            }
        }
        Some(out)
    }

    /// Marks every key as used (nothing more can be said about a table whose kind is unknown).
    pub fn ignore_rest(&mut self) {
        if let Some(t) = self.node.as_table() {
            self.used.extend(t.iter().map(|(k, _, _)| k.clone()));
        }
    }

    /// Reports the keys of the table that are not in `known` (nor already read).
    pub fn finish(&mut self, known: &[&str]) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let Some(entries) = self.node.as_table() else { return };
        for (k, at, n) in entries {
            if known.contains(&k.as_str()) || self.used.contains(k) {
                continue;
            }
            let hint = known
                .iter()
                .filter(|c| edit_distance(c, k) <= 2)
                .min_by_key(|c| edit_distance(c, k))
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            let at = if matches!(at, Loc::Unknown) { n.at.clone() } else { at.clone() };
            let mut all: Vec<&str> = known.to_vec();
            all.sort();
            let msg = format!("unknown key `{k}` in {}{hint} (known keys: {})", self.what, all.join(", "));
            self.rep.error(&at, self.stage.as_deref(), msg);
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
