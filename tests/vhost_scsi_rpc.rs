//! vhost-scsi controller RPCs, SPDK-compatible: create, add/remove targets, the
//! `vhost_get_controllers` shape, delete refused while targets remain, claims.

mod common;

use common::in_process::InProcess;
use serde_json::json;

#[test]
fn scsi_controller_lifecycle() {
    let d = InProcess::start("0x1");
    for n in ["Malloc0", "Malloc1"] {
        d.rpc(
            "bdev_malloc_create",
            json!({"name": n, "num_blocks": 2048, "block_size": 512}),
        )
        .unwrap();
    }
    assert_eq!(
        d.rpc(
            "vhost_create_scsi_controller",
            json!({"ctrlr": "scsi.0", "delay": false})
        )
        .unwrap(),
        json!(true)
    );
    assert_eq!(
        d.rpc("vhost_create_scsi_controller", json!({"ctrlr": "scsi.0"}))
            .unwrap_err(),
        (-32602, "File exists".into())
    );
    assert_eq!(
        d.rpc(
            "vhost_create_scsi_controller",
            json!({"ctrlr": "scsi.1", "cpumask": "0x2"})
        )
        .unwrap_err()
        .0,
        -32602
    );
    assert_eq!(
        d.rpc(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": "scsi.0", "scsi_target_num": -1, "bdev_name": "Malloc0"})
        )
        .unwrap(),
        json!(0)
    );
    assert_eq!(
        d.rpc(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": "scsi.0", "scsi_target_num": 3, "bdev_name": "Malloc1"})
        )
        .unwrap(),
        json!(3)
    );
    // Claimed, occupied slot, out of range, unknown bdev, unknown controller.
    let add_err = |ctrlr: &str, num: u32, bdev: &str| {
        d.rpc(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": ctrlr, "scsi_target_num": num, "bdev_name": bdev}),
        )
        .unwrap_err()
    };
    assert_eq!(add_err("scsi.0", 1, "Malloc0").0, -32602);
    assert_eq!(
        add_err("scsi.0", 3, "Malloc0"),
        (-32602, "File exists".into())
    );
    assert_eq!(
        add_err("scsi.0", 8, "Malloc0"),
        (-32602, "Invalid argument".into())
    );
    assert_eq!(
        add_err("scsi.0", 1, "Nope"),
        (-32602, "No such device".into())
    );
    assert_eq!(
        add_err("nope", 1, "Malloc0"),
        (-32602, "No such device".into())
    );
    let c = d
        .rpc("vhost_get_controllers", json!({"name": "scsi.0"}))
        .unwrap();
    assert_eq!(
        c[0]["backend_specific"],
        json!({"scsi": [
            {"target_name": "Target 0", "id": 0, "scsi_dev_num": 0, "luns": [{"id": 0, "bdev_name": "Malloc0"}]},
            {"target_name": "Target 3", "id": 3, "scsi_dev_num": 3, "luns": [{"id": 0, "bdev_name": "Malloc1"}]}
        ]})
    );
    let entries = d.app.vhost.subsystem_config_entries("vhost_scsi");
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[2].0, "vhost_scsi_controller_add_target");
    assert!(
        d.app.vhost.config_entries().is_empty(),
        "no vhost_blk entries"
    );
    // Delete refused while targets remain.
    assert_eq!(
        d.rpc("vhost_delete_controller", json!({"ctrlr": "scsi.0"}))
            .unwrap_err(),
        (-32602, "Device or resource busy".into())
    );
    assert_eq!(
        d.rpc(
            "vhost_scsi_controller_remove_target",
            json!({"ctrlr": "scsi.0", "scsi_target_num": 5})
        )
        .unwrap_err(),
        (-32602, "No such device".into())
    );
    for t in [0, 3] {
        assert_eq!(
            d.rpc(
                "vhost_scsi_controller_remove_target",
                json!({"ctrlr": "scsi.0", "scsi_target_num": t})
            )
            .unwrap(),
            json!(true)
        );
    }
    assert!(d.app.bdevs.get("Malloc0").unwrap().claimed_by().is_none());
    assert_eq!(
        d.rpc("vhost_delete_controller", json!({"ctrlr": "scsi.0"}))
            .unwrap(),
        json!(true)
    );
}
