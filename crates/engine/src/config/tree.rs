//! The pipeline file as a small tree that remembers where every key and value came from.

pub use lake::error::Loc;
use toml_edit::{Item, Value};


#[derive(Debug, Clone)]
pub struct Node {
    pub val: Val,
    pub at: Loc,
}

#[derive(Debug, Clone)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    /// Keys in file order, each with the location of the key itself.
    Table(Vec<(String, Loc, Node)>),
}

impl Node {
    pub fn as_table(&self) -> Option<&[(String, Loc, Node)]> {
        match &self.val {
            Val::Table(t) => Some(t),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_table()?.iter().find(|(k, _, _)| k == key).map(|(_, _, n)| n)
    }

    /// Location of `key` in this table (falls back to the table's own).
    pub fn key_loc(&self, key: &str) -> Loc {
        self.as_table()
            .and_then(|t| t.iter().find(|(k, _, _)| k == key))
            .map(|(_, at, n)| if matches!(at, Loc::Unknown) { n.at.clone() } else { at.clone() })
            .unwrap_or_else(|| self.at.clone())
    }

    pub fn type_name(&self) -> &'static str {
        match self.val {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }

    /// The value as written, for messages.
    pub fn show(&self) -> String {
        match &self.val {
            Val::Str(s) => format!("{s:?}"),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::Datetime(d) => d.clone(),
            Val::Array(a) => format!("[{}]", a.iter().map(Node::show).collect::<Vec<_>>().join(", ")),
            Val::Table(_) => "{…}".into(),
        }
    }
}

struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        Lines(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }

    fn loc(&self, span: Option<std::ops::Range<usize>>) -> Loc {
        match span {
            Some(r) => {
                let line = self.0.partition_point(|&s| s <= r.start);
                Loc::File { line, col: r.start - self.0[line - 1] + 1 }
            }
            None => Loc::Unknown,
        }
    }
}

/// Parses TOML text, or returns where and why it is not TOML.
pub fn parse(text: &str) -> Result<Node, (Loc, String)> {
    let lines = Lines::new(text);
    let doc = toml_edit::Document::parse(text.to_string())
        .map_err(|e| (lines.loc(e.span()), e.message().trim().to_string()))?;
    Ok(item(doc.as_item(), &lines, Loc::File { line: 1, col: 1 }))
}

fn item(it: &Item, lines: &Lines, fallback: Loc) -> Node {
    match it {
        Item::Value(v) => value(v, lines),
        Item::Table(t) => {
            let at = match lines.loc(t.span()) {
                Loc::Unknown => fallback,
                l => l,
            };
            let entries = t
                .iter()
                .map(|(k, v)| {
                    let kat = lines.loc(t.key(k).and_then(|k| k.span()));
                    (k.to_string(), kat.clone(), item(v, lines, kat))
                })
                .collect();
            Node { val: Val::Table(entries), at }
        }
        Item::ArrayOfTables(a) => Node {
            val: Val::Array(a.iter().map(|t| item(&Item::Table(t.clone()), lines, fallback.clone())).collect()),
            at: fallback,
        },
        Item::None => Node { val: Val::Table(Vec::new()), at: fallback },
    }
}

fn value(v: &Value, lines: &Lines) -> Node {
    let at = lines.loc(v.span());
    let val = match v {
        Value::String(s) => Val::Str(s.value().clone()),
        Value::Integer(i) => Val::Int(*i.value()),
        Value::Float(f) => Val::Float(*f.value()),
        Value::Boolean(b) => Val::Bool(*b.value()),
        Value::Datetime(d) => Val::Datetime(d.value().to_string()),
        Value::Array(a) => Val::Array(a.iter().map(|x| value(x, lines)).collect()),
        Value::InlineTable(t) => Val::Table(
            t.iter()
                .map(|(k, x)| (k.to_string(), lines.loc(t.key(k).and_then(|k| k.span())), value(x, lines)))
                .collect(),
        ),
    };
    Node { val, at }
}

/// Grafts `stage.key[.sub]=value` (or `pipeline.key=value`) onto the tree. The value is read
/// as TOML when it is valid TOML (`3`, `true`, `[1, 2]`, `"x"`) and as a plain string otherwise.
pub fn apply_set(root: &mut Node, set: &str) -> Result<(), String> {
    let (path, raw) = set.split_once('=').ok_or("expected STAGE.KEY=VALUE")?;
    let parts: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err("expected STAGE.KEY=VALUE".into());
    }
    let at = Loc::Set(set.to_string());
    let mut v = match raw.trim().parse::<Value>() {
        Ok(v) => {
            let mut n = value(&v, &Lines::new(""));
            relocate(&mut n, &at);
            n
        }
        Err(_) => Node { val: Val::Str(raw.trim().to_string()), at: at.clone() },
    };
    v.at = at.clone();
    let mut cur = root;
    let full: Vec<&str> = if parts[0] == "pipeline" {
        parts.clone()
    } else {
        let exists = cur.get("stages").and_then(|s| s.get(parts[0])).is_some();
        if !exists {
            return Err(format!("names no stage `{}`", parts[0]));
        }
        std::iter::once("stages").chain(parts.iter().copied()).collect()
    };
    for (i, key) in full.iter().enumerate() {
        let last = i == full.len() - 1;
        let Val::Table(entries) = &mut cur.val else {
            return Err(format!("`{}` is not a table", full[..i].join(".")));
        };
        let pos = match entries.iter().position(|(k, _, _)| k == key) {
            Some(p) => p,
            None => {
                let fresh = Node { val: Val::Table(Vec::new()), at: at.clone() };
                entries.push((key.to_string(), at.clone(), fresh));
                entries.len() - 1
            }
        };
        if last {
            entries[pos].2 = v;
            entries[pos].1 = at;
            return Ok(());
        }
        cur = &mut entries[pos].2;
    }
    Ok(())
}

fn relocate(n: &mut Node, at: &Loc) {
    n.at = at.clone();
    match &mut n.val {
        Val::Array(a) => a.iter_mut().for_each(|x| relocate(x, at)),
        Val::Table(t) => t.iter_mut().for_each(|(_, l, x)| {
            *l = at.clone();
            relocate(x, at)
        }),
        _ => {}
    }
}
