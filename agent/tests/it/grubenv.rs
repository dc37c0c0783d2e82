//! The grubenv encoder against the real `grub-editenv` (Debian's grub-common):
//! random variable sets, escapes, in-place rewrites and unsets, and refusal
//! of what does not fit in 1024 bytes. And the Rust model of the boot rule
//! (`bootloader::boot`, which the other tests use to play GRUB) against the
//! shipped `grub/sluice.cfg` run by GRUB itself (`grub-emu`) for every
//! environment the variables can make.

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
    ab.stage(Slot::B);
    ab.apply_to(&mut env);
    env.store(&file).unwrap();
    let out = Command::new("grub-editenv")
        .arg(&file)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\nTRIAL=B\n"
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
        "set TRIAL=\"\"",
        "load_env --file \"$sluice_env\" ORDER A_OK A_TRY B_OK B_TRY TRIAL",
        "save_env --file \"$sluice_env\" A_TRY",
        "save_env --file \"$sluice_env\" B_TRY",
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

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (apt-get install grub-emu mtools dosfstools)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every environment the A/B variables can make: each variable absent or
/// set to each value the rule tells apart (and one it must not mistake).
fn all_environments() -> Vec<GrubEnv> {
    let orders: &[Option<&str>] = &[
        None,
        Some("A B"),
        Some("B A"),
        Some("A"),
        Some("B"),
        Some(""),
    ];
    let flags: &[Option<&str>] = &[None, Some("0"), Some("1")];
    let trials: &[Option<&str>] = &[None, Some(""), Some("A"), Some("B")];
    let mut out = Vec::new();
    for order in orders {
        for a_ok in flags {
            for a_try in flags {
                for b_ok in flags {
                    for b_try in flags {
                        for trial in trials {
                            let mut env = GrubEnv::new();
                            for (k, v) in [
                                ("ORDER", order),
                                ("A_OK", a_ok),
                                ("A_TRY", a_try),
                                ("B_OK", b_ok),
                                ("B_TRY", b_try),
                                ("TRIAL", trial),
                            ] {
                                if let Some(v) = v {
                                    env.set(k, v).unwrap();
                                }
                            }
                            out.push(env);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The shipped snippet's choice, run by GRUB (`grub-emu`, with a FAT disk
/// image holding one environment block per case, as a device's boot
/// partition holds its grubenv), equals the Rust model's for every
/// environment: the same slot (or none) and the same block afterwards,
/// byte for byte (a try saved only for the slot on trial).
#[test]
fn rust_model_matches_the_shipped_snippet_run_by_grub() {
    let cfg =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grub/sluice.cfg")).unwrap();
    let select = cfg
        .split_once("# sluice-select: begin\n")
        .and_then(|(_, rest)| rest.split_once("# sluice-select: end\n"))
        .expect("grub/sluice.cfg marks its selection with `# sluice-select: begin/end`")
        .0;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("select.cfg"), select).unwrap();
    let envs = all_environments();
    let before = d.join("before");
    std::fs::create_dir(&before).unwrap();
    let mut script = String::from("insmod fat\ninsmod loadenv\ninsmod test\ninsmod echo\n");
    for (i, env) in envs.iter().enumerate() {
        std::fs::write(before.join(format!("e{i}")), env.encode().unwrap()).unwrap();
        script.push_str(&format!(
            "set sluice_env=(hd0)/e/e{i}\nsource (host){}/select.cfg\necho \"SLUICE-RESULT {i} [$sluice_slot]\"\n",
            d.display()
        ));
    }
    script.push_str("halt\n");
    std::fs::write(d.join("grub.cfg"), script).unwrap();
    let img = d.join("boot.img");
    sh(Command::new("mkfs.vfat")
        .args(["-F", "16", "-C"])
        .arg(&img)
        .arg("16384"));
    sh(Command::new("mmd").arg("-i").arg(&img).arg("::/e"));
    let mut copy = Command::new("mcopy");
    copy.arg("-i").arg(&img);
    for i in 0..envs.len() {
        copy.arg(before.join(format!("e{i}")));
    }
    sh(copy.arg("::/e/"));
    std::fs::write(d.join("device.map"), format!("(hd0) {}\n", img.display())).unwrap();

    let out = sh(Command::new("timeout")
        .arg("300")
        .arg("grub-emu")
        .arg("-d")
        .arg(d)
        .arg("-m")
        .arg(d.join("device.map"))
        .stdin(std::process::Stdio::null()));
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut grub_choice = vec![None; envs.len()];
    for part in console.split("SLUICE-RESULT ").skip(1) {
        let (i, rest) = part.split_once(" [").unwrap();
        let i: usize = i.parse().unwrap();
        let slot = rest.split_once(']').unwrap().0;
        grub_choice[i] = Some(Slot::parse(slot));
    }
    let after = d.join("after");
    std::fs::create_dir(&after).unwrap();
    sh(Command::new("mcopy")
        .arg("-i")
        .arg(&img)
        .arg("::/e/*")
        .arg(&after));

    let mut halts = 0;
    let mut saves = 0;
    for (i, env) in envs.iter().enumerate() {
        let grub = grub_choice[i].unwrap_or_else(|| {
            panic!("GRUB printed no result for case {i} ({env:?}); console:\n{console}")
        });
        let model_file = d.join(format!("model{i}"));
        std::fs::write(&model_file, env.encode().unwrap()).unwrap();
        let model = sluice_agent::bootloader::boot(&model_file).unwrap();
        assert_eq!(model, grub, "case {i}: {:?}", env.vars());
        let grub_block = std::fs::read(after.join(format!("e{i}"))).unwrap();
        assert_eq!(
            std::fs::read(&model_file).unwrap(),
            grub_block,
            "case {i}: the block after the boot differs: {:?}",
            env.vars()
        );
        halts += usize::from(grub.is_none());
        saves += usize::from(grub_block != env.encode().unwrap());
    }
    assert!(halts > 0 && saves > 0, "{halts} halts, {saves} saves");
}
