//! `blockd --config FILE` against real daemon processes: every configuration change made
//! over RPC is in the file, a daemon killed with SIGKILL and started again with the same
//! file has the same bdevs (names and UUIDs), controllers, targets and exports; a torn file
//! fails the start with a clear error; saves replace the file by rename, never in place.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, StartFailure};
use serde_json::{json, Value};

/// A daemon's fixed paths, kept across its restarts.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sockets")).unwrap();
        Site { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("blockd.json")
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-m".into(),
            "0x1".into(),
            "-S".into(),
            self.path("sockets").display().to_string(),
            "--config".into(),
            self.config().display().to_string(),
        ]
    }

    fn try_start(&self) -> Result<Daemon, StartFailure> {
        let a = self.args();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Daemon::try_start_at(&self.path("rpc.sock"), &a)
    }

    fn start(&self) -> Daemon {
        self.try_start()
            .unwrap_or_else(|f| panic!("blockd failed to start ({}):\n{}", f.status, f.log))
    }

    fn file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.config()).unwrap()).unwrap()
    }
}

fn kill9(d: &mut Daemon) {
    d.signal(libc::SIGKILL);
    let st = d.wait(Duration::from_secs(20));
    assert!(!st.success(), "SIGKILL must end it: {st}");
}

/// What a client can see of the daemon's objects.
fn observed(d: &Daemon) -> Value {
    let subsystems = d.rpc_ok("framework_get_subsystems", Value::Null);
    let mut config = serde_json::Map::new();
    for s in subsystems.as_array().unwrap() {
        let name = s["subsystem"].as_str().unwrap();
        config.insert(
            name.into(),
            d.rpc_ok("framework_get_config", json!({"name": name})),
        );
    }
    let mut bdevs = d.rpc_ok("bdev_get_bdevs", Value::Null);
    for b in bdevs.as_array_mut().unwrap() {
        // Whether a frontend has claimed it right now is not configuration.
        b.as_object_mut().unwrap().remove("claimed");
    }
    json!({
        "config": config,
        "bdevs": bdevs,
        "controllers": d.rpc_ok("vhost_get_controllers", Value::Null),
        "exports": d.rpc_ok("nbd_get_exports", Value::Null),
        "disks": d.rpc_ok("nbd_get_disks", Value::Null),
    })
}

fn names(v: &Value, key: &str) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o[key].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn sparse(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn every_object_comes_back_after_kill_9_and_deletions_stay_deleted() {
    let site = Site::new();
    let mut d = site.start();
    assert!(
        site.config().exists(),
        "the file is written at the first start"
    );
    let aio_file = site.path("aio.img");
    sparse(&aio_file, 8 << 20);
    let nbd_sock = site.path("nbd.sock");

    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 4096, "block_size": 512}),
    );
    d.rpc_ok(
        "bdev_aio_create",
        json!({"name": "Aio0", "filename": aio_file, "block_size": 512}),
    );
    d.rpc_ok(
        "bdev_null_create",
        json!({"name": "Null0", "num_blocks": 2048, "block_size": 4096}),
    );
    d.rpc_ok(
        "bdev_set_qos_limit",
        json!({"name": "Malloc0", "rw_ios_per_sec": 20000}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
    );
    d.rpc_ok(
        "vhost_controller_set_coalescing",
        json!({"ctrlr": "vhost.0", "delay_base_us": 50, "iops_threshold": 10000}),
    );
    d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "scsi.0"}));
    assert_eq!(
        d.rpc_ok(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": "scsi.0", "scsi_target_num": 2, "bdev_name": "Null0"}),
        ),
        json!(2)
    );
    d.rpc_ok("nbd_server_start", json!({"unix_path": nbd_sock}));
    d.rpc_ok(
        "nbd_export_add",
        json!({"bdev_name": "Aio0", "name": "disk0"}),
    );

    let before = observed(&d);
    // The file holds what save_config shows, once every call has returned.
    let file = site.file();
    for s in file["subsystems"].as_array().unwrap() {
        let name = s["subsystem"].as_str().unwrap();
        assert_eq!(s["config"], before["config"][name], "subsystem {name}");
    }
    assert_eq!(
        names(&before["bdevs"], "name"),
        ["Aio0", "Malloc0", "Null0"]
    );
    assert_eq!(
        names(&before["controllers"], "ctrlr"),
        ["scsi.0", "vhost.0"]
    );
    assert_eq!(names(&before["exports"], "name"), ["disk0"]);

    kill9(&mut d);
    let mut d = site.start();
    let after = observed(&d);
    assert_eq!(after, before, "the restarted daemon differs");
    let uuids = |v: &Value| names(&v["bdevs"], "uuid");
    assert_eq!(uuids(&after), uuids(&before));
    assert!(d.log().contains("configuration replayed"), "{}", d.log());
    for sock in ["vhost.0", "scsi.0"] {
        assert!(
            site.path("sockets").join(sock).exists(),
            "{sock} is listening again"
        );
    }
    assert!(std::os::unix::net::UnixStream::connect(&nbd_sock).is_ok());

    // Deletions persist too.
    d.rpc_ok(
        "vhost_scsi_controller_remove_target",
        json!({"ctrlr": "scsi.0", "scsi_target_num": 2}),
    );
    d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "scsi.0"}));
    d.rpc_ok("bdev_null_delete", json!({"name": "Null0"}));
    d.rpc_ok("nbd_export_remove", json!({"name": "disk0"}));
    kill9(&mut d);
    let d = site.start();
    let gone = observed(&d);
    assert_eq!(names(&gone["bdevs"], "name"), ["Aio0", "Malloc0"]);
    assert_eq!(names(&gone["controllers"], "ctrlr"), ["vhost.0"]);
    assert_eq!(gone["exports"], json!([]));
    assert_eq!(
        gone["controllers"],
        before["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ctrlr"] == "vhost.0")
            .cloned()
            .collect::<Value>()
    );
    assert_eq!(uuids(&gone).len(), 2);
    for u in uuids(&gone) {
        assert!(uuids(&before).contains(&u), "{u} changed");
    }
}

#[test]
fn a_sigterm_keeps_the_objects_it_tears_down() {
    let site = Site::new();
    let mut d = site.start();
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "M", "num_blocks": 256, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "v", "dev_name": "M"}),
    );
    let before = observed(&d);
    assert!(d.stop().success());
    let d = site.start();
    assert_eq!(observed(&d), before);
}

#[test]
fn a_torn_file_fails_the_start_clearly_and_is_left_alone() {
    let site = Site::new();
    let torn = b"{\"subsystems\": [{\"subsystem\": \"bdev\", \"config\": [{\"method\": \"bdev_mal";
    std::fs::write(site.config(), torn).unwrap();
    let f = site
        .try_start()
        .err()
        .expect("a torn file must fail the start");
    assert_eq!(f.status.code(), Some(1), "{}", f.log);
    assert!(
        f.log.contains("is not a valid JSON configuration"),
        "{}",
        f.log
    );
    assert!(f.log.contains("blockd.json"), "{}", f.log);
    assert_eq!(std::fs::read(site.config()).unwrap(), torn);

    // A method blockd lacks: the replay fails naming it, and the file stays as it was.
    let bad = json!({"subsystems": [{"subsystem": "bdev",
        "config": [{"method": "bdev_nvme_attach_controller", "params": {}}]}]});
    std::fs::write(site.config(), bad.to_string()).unwrap();
    let f = site
        .try_start()
        .err()
        .expect("an unknown method must fail the start");
    assert!(f.log.contains("bdev_nvme_attach_controller"), "{}", f.log);
    assert_eq!(site.file(), bad);

    // --json and --config together are refused.
    let a = [
        "--config",
        "/nonexistent/x.json",
        "--json",
        "/nonexistent/y.json",
    ];
    let f = Daemon::try_start(&a).err().expect("conflicting flags");
    assert!(f.log.contains("cannot be used with"), "{}", f.log);
}

#[test]
fn saves_replace_the_file_by_rename_and_a_failed_save_fails_the_call() {
    let site = Site::new();
    let d = site.start();
    let ino = || std::fs::metadata(site.config()).unwrap().ino();
    let first = ino();
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "A", "num_blocks": 256, "block_size": 512}),
    );
    let second = ino();
    assert_ne!(
        first, second,
        "a save is a new file renamed over the old one"
    );
    // A call that changes nothing does not write.
    d.rpc_ok("bdev_get_bdevs", Value::Null);
    assert_eq!(ino(), second);
    let tmp = site.path("blockd.json.tmp");
    assert!(!tmp.exists(), "the temporary file was renamed away");
    let mode = std::fs::metadata(site.config()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The temporary file cannot be created: the change is made, the call says it is not
    // saved, and the file still holds the previous configuration, whole.
    std::fs::create_dir(&tmp).unwrap();
    let saved = site.file();
    let (code, msg) = d
        .rpc(
            "bdev_malloc_create",
            json!({"name": "B", "num_blocks": 256, "block_size": 512}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::EIO as i64), "{msg}");
    assert!(msg.contains("could not be saved"), "{msg}");
    assert!(msg.contains("blockd.json.tmp"), "{msg}");
    assert!(d.log().contains("cannot save the configuration"));
    assert_eq!(site.file(), saved);
    assert_eq!(ino(), second);
    // Read-only calls are not failed by the pending save.
    d.rpc_ok("bdev_get_bdevs", json!({"name": "B"}));
    std::fs::remove_dir(&tmp).unwrap();
    // The next call saves everything, B included.
    d.rpc_ok("bdev_get_bdevs", Value::Null);
    let text = std::fs::read_to_string(site.config()).unwrap();
    assert!(text.contains("\"B\""), "{text}");
}
