//! The documentation must not drift from the code: every ```toml block of
//! `docs/agent.md` and `docs/quickstart-device.md` is loaded with the
//! agent's own loader (`Config::load`, which refuses unknown keys), there is
//! an example for every slot kind, and the key reference in `docs/agent.md`
//! names exactly the keys the configuration accepts.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use sluice_agent::config::{Boot, Config, Registry, SlotKind, Slots};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn doc(name: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path, text)
}

/// The ```toml fenced blocks of a Markdown text, with the line each starts on.
fn toml_blocks(md: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in md.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```toml" => current = Some((n + 1, String::new())),
            None => {}
            Some(_) if line.trim() == "```" => blocks.push(current.take().unwrap()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "a ```toml block is never closed");
    blocks
}

/// Loads every ```toml block of a doc with the agent's loader.
fn load_examples(name: &str) -> Vec<Config> {
    let (path, text) = doc(name);
    let dir = tempfile::tempdir().unwrap();
    let blocks = toml_blocks(&text);
    assert!(
        !blocks.is_empty(),
        "{} has no ```toml block",
        path.display()
    );
    blocks
        .into_iter()
        .map(|(line, block)| {
            let file = dir.path().join(format!("line-{line}.toml"));
            std::fs::write(&file, &block).unwrap();
            Config::load(&file).unwrap_or_else(|e| {
                panic!(
                    "the ```toml block at {}:{line} is not a valid agent.toml: {e:#}",
                    path.display()
                )
            })
        })
        .collect()
}

/// Every slot kind the agent supports. The match fails to compile when a
/// kind is added, so this list (and the docs) must follow.
fn all_kinds() -> Vec<SlotKind> {
    let all = [SlotKind::Dir, SlotKind::Image, SlotKind::Block];
    for k in all {
        match k {
            SlotKind::Dir | SlotKind::Image | SlotKind::Block => {}
        }
    }
    all.to_vec()
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut names));
    assert!(!names.is_empty(), "no fields recorded");
    names
}

/// Every key `agent.toml` accepts: `server`, ..., `slots.kind`, `boot.reboot`, ...
fn accepted_keys() -> BTreeSet<String> {
    let tables = [
        ("slots", fields::<Slots>()),
        ("boot", fields::<Boot>()),
        ("registry", fields::<Registry>()),
    ];
    let mut keys = BTreeSet::new();
    for f in fields::<Config>() {
        if !tables.iter().any(|(t, _)| t == f) {
            keys.insert(f.to_string());
        }
    }
    for (table, fs) in tables {
        assert!(fields::<Config>().contains(&table), "no table {table}");
        for f in fs {
            keys.insert(format!("{table}.{f}"));
        }
    }
    keys
}

/// The keys named in the first column of the reference tables of
/// `docs/agent.md` (rows of the `## Keys` section).
fn documented_keys(md: &str) -> BTreeSet<String> {
    let section = md
        .split("\n## ")
        .find(|s| s.starts_with("Keys"))
        .expect("docs/agent.md has a `## Keys` section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_string()))
        .collect()
}

#[test]
fn every_agent_toml_in_docs_agent_md_loads() {
    let configs = load_examples("agent.md");
    let kinds: Vec<SlotKind> = configs.iter().map(|c| c.slots.kind).collect();
    for k in all_kinds() {
        assert!(
            kinds.contains(&k),
            "docs/agent.md has no complete example for slot kind {k:?}"
        );
    }
}

#[test]
fn the_quickstart_agent_toml_loads() {
    let configs = load_examples("quickstart-device.md");
    assert!(configs.iter().all(|c| c.slots.kind == SlotKind::Dir));
}

#[test]
fn the_key_reference_names_exactly_the_accepted_keys() {
    let (_, md) = doc("agent.md");
    let accepted = accepted_keys();
    let documented = documented_keys(&md);
    let missing: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        missing.is_empty(),
        "keys the agent accepts that docs/agent.md's `## Keys` does not document: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "keys docs/agent.md's `## Keys` documents that the agent does not accept: {unknown:?}"
    );
}

/// The probe itself: it sees the real field names, and a misspelt key in
/// an example is refused by the loader.
#[test]
fn the_checks_can_fail() {
    let keys = accepted_keys();
    assert!(keys.contains("server") && keys.contains("boot.boot_id"));
    assert!(keys.contains("registry.min_bytes_per_s"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "server = \"http://x\"\nproduct = \"p\"\nchannel = \"c\"\n\
         [slots]\nkind = \"dir\"\na = \"/a\"\nb = \"/b\"\n[boot]\nreboot_cmd = [\"true\"]\n",
    )
    .unwrap();
    assert!(Config::load(&file).is_err());
}
