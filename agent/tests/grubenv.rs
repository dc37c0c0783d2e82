//! The grubenv encoder against the real `grub-editenv` (Debian's grub-common):
//! random variable sets, escapes, in-place rewrites and unsets, and refusal
//! of what does not fit in 1024 bytes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_agent::bootloader::{AbState, GrubEnv, Slot};
use std::process::Command;

fn grub_editenv(file: &std::path::Path, args: &[String]) -> bool {
    let out = Command::new("grub-editenv")
        .arg(file)
        .args(args)
        .output()
        .expect("grub-editenv is installed (apt-get install grub-common)");
    out.status.success()
}

fn random_name(rng: &mut StdRng) -> String {
    const FIRST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_";
    const REST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_0123456789";
    let n = rng.gen_range(0..12);
    let mut s = String::new();
    s.push(FIRST[rng.gen_range(0..FIRST.len())] as char);
    for _ in 0..n {
        s.push(REST[rng.gen_range(0..REST.len())] as char);
    }
    s
}

fn random_value(rng: &mut StdRng, max: usize) -> String {
    const CHARS: &[char] = &[
        'a', 'Z', '0', '9', ' ', '=', '#', '\\', '\n', '"', '\'', '$', '{', '}', ';', 'é', '☃',
        '\t',
    ];
    let n = rng.gen_range(0..max);
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())])
        .collect()
}

/// Many random sequences of `set` (new and existing names) and `unset`:
/// after each command, our block equals grub-editenv's byte for byte, or
/// both refuse because it does not fit.
#[test]
fn encoder_matches_grub_editenv_for_random_sets() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0x0051_71ce);
    let mut refusals = 0;
    let mut compared = 0;
    for round in 0..60 {
        let file = dir.path().join(format!("env{round}"));
        assert!(grub_editenv(&file, &["create".into()]));
        let mut ours = GrubEnv::new();
        let mut names: Vec<String> = Vec::new();
        for _ in 0..rng.gen_range(1..12) {
            let op = rng.gen_range(0..10);
            if op == 0 && !names.is_empty() {
                let n = names[rng.gen_range(0..names.len())].clone();
                assert!(grub_editenv(&file, &["unset".into(), n.clone()]));
                ours.unset(&n);
            } else {
                // Several variables per call, as `grub-editenv FILE set K=V K2=V2`.
                let mut args = vec!["set".to_string()];
                let mut next = ours.clone();
                // grub-editenv sets one variable after the other and gives up,
                // writing nothing, at the first that does not fit.
                let mut fits = true;
                for _ in 0..rng.gen_range(1..4) {
                    let name = if !names.is_empty() && rng.gen_bool(0.3) {
                        names[rng.gen_range(0..names.len())].clone()
                    } else {
                        random_name(&mut rng)
                    };
                    let max = if rng.gen_bool(0.1) { 900 } else { 60 };
                    let value = random_value(&mut rng, max);
                    next.set(&name, &value).unwrap();
                    fits &= next.encode().is_ok();
                    args.push(format!("{name}={value}"));
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                let theirs_ok = grub_editenv(&file, &args);
                match fits {
                    true => {
                        assert!(theirs_ok, "grub-editenv refused what we encode: {args:?}");
                        ours = next;
                    }
                    false => {
                        assert!(!theirs_ok, "grub-editenv accepted what we refuse");
                        refusals += 1;
                        // grub-editenv leaves the file as it was; so do we.
                        names.retain(|n| ours.get(n).is_some());
                    }
                }
            }
            let theirs = std::fs::read(&file).unwrap();
            assert_eq!(theirs.len(), 1024);
            assert_eq!(
                ours.encode().unwrap(),
                theirs,
                "block differs from grub-editenv's"
            );
            assert_eq!(GrubEnv::parse(&theirs).unwrap(), ours);
            compared += 1;
        }
    }
    assert!(compared > 200, "only {compared} comparisons");
    assert!(refusals > 0, "the random sets never went over 1024 bytes");
}

/// What the agent writes is what grub-editenv lists, and what it reads back.
#[test]
fn agent_blocks_read_by_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grubenv");
    let mut env = GrubEnv::new();
    let mut ab = AbState::initial();
    ab.switch_to(Slot::B);
    ab.apply_to(&mut env);
    env.store(&file).unwrap();
    let out = Command::new("grub-editenv")
        .arg(&file)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n"
    );
    // grub-editenv rewrites one variable; the agent reads the result.
    assert!(grub_editenv(&file, &["set".into(), "B_TRY=1".into()]));
    let back = AbState::from_env(&GrubEnv::load(&file).unwrap());
    assert!(back.is_tried(Slot::B));
    assert_eq!(back.next_boot(), Some(Slot::A));
}

/// The exact edge: a block filled to the last byte is accepted by both, one
/// byte more is refused by both.
#[test]
fn exactly_1024_bytes_fits_and_1025_does_not() {
    let dir = tempfile::tempdir().unwrap();
    for (n, fits) in [(927, true), (928, false)] {
        let file = dir.path().join(format!("e{n}"));
        assert!(grub_editenv(&file, &["create".into()]));
        let value = "x".repeat(n);
        let theirs_ok = grub_editenv(&file, &["set".into(), format!("A={value}")]);
        let mut ours = GrubEnv::new();
        ours.set("A", &value).unwrap();
        assert_eq!(theirs_ok, fits);
        assert_eq!(ours.encode().is_ok(), fits);
        if fits {
            assert_eq!(ours.encode().unwrap(), std::fs::read(&file).unwrap());
        }
    }
}

/// The shipped `grub/sluice.cfg` parses with GRUB's own script checker and
/// uses exactly the variables and defaults the agent's model reads.
#[test]
fn shipped_grub_snippet_is_valid_and_matches_the_model() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/grub/sluice.cfg");
    let st = Command::new("grub-script-check").arg(cfg).status().unwrap();
    assert!(st.success(), "grub-script-check refused {cfg}");
    let text = std::fs::read_to_string(cfg).unwrap();
    for line in [
        "set ORDER=\"A B\"",
        "set A_OK=1",
        "set B_OK=0",
        "load_env --file \"$sluice_env\" ORDER A_OK A_TRY B_OK B_TRY",
        "save_env --file \"$sluice_env\" A_TRY B_TRY",
        "sluice.slot=${sluice_slot}",
    ] {
        assert!(text.contains(line), "snippet lacks {line:?}");
    }
    // The model's defaults are the snippet's: an empty block boots A.
    assert_eq!(
        AbState::from_env(&GrubEnv::new()).next_boot(),
        Some(Slot::A)
    );
}
