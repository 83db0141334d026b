//! How `blockctl image` shows what librbd reports, the way the `rbd` tool shows it: names of
//! feature and flag bits (and names back to bits for `--image-feature`), timestamps as
//! `ctime(3)` prints them, and the JSON objects and text of `rbd info` and `rbd snap ls`.
//! Scripts written against `rbd --format json` read blockctl's output unchanged.

use std::ffi::c_char;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::size::human;
use crate::rbd::{ImageInfo, RbdError, RbdResult, SnapInfo};

/// Feature bits and their names (`rbd/features.h`).
pub const FEATURES: &[(u64, &str)] = &[
    (1 << 0, "layering"),
    (1 << 1, "striping"),
    (1 << 2, "exclusive-lock"),
    (1 << 3, "object-map"),
    (1 << 4, "fast-diff"),
    (1 << 5, "deep-flatten"),
    (1 << 6, "journaling"),
    (1 << 7, "data-pool"),
    (1 << 8, "operations"),
    (1 << 9, "migrating"),
    (1 << 10, "non-primary"),
    (1 << 11, "dirty-cache"),
];

/// Operation feature bits (`RBD_OPERATION_FEATURE_*`), as `rbd info` names them.
pub const OP_FEATURES: &[(u64, &str)] = &[
    (1 << 0, "clone-parent"),
    (1 << 1, "clone-child"),
    (1 << 2, "group"),
    (1 << 3, "snap-trash"),
];

/// Image flags (`RBD_FLAG_*`), as `rbd info` names them.
pub const FLAGS: &[(u64, &str)] = &[
    (1 << 0, "object map invalid"),
    (1 << 1, "fast diff invalid"),
];

/// Names of the bits of `bits` in `table`.
pub fn bit_names(table: &[(u64, &'static str)], bits: u64) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Names of the feature bits set in `features`.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    bit_names(FEATURES, features)
}

/// The feature bits of comma-separated names (`layering,exclusive-lock`) or a number.
pub fn parse_features(s: &str) -> RbdResult<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let mut bits = 0;
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match FEATURES.iter().find(|(_, n)| *n == name) {
            Some((b, _)) => bits |= b,
            None => {
                return Err(RbdError::invalid(format!(
                    "unknown image feature {name:?} (known: {})",
                    FEATURES.iter().map(|f| f.1).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    }
    Ok(bits)
}

/// A time as `rbd` prints it (`ctime(3)` in local time, without the newline).
pub fn ctime(t: SystemTime) -> String {
    // Whole seconds, rounded down as a `timespec`'s `tv_sec` is.
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            i64::try_from(whole).map_or(i64::MIN, |w| -w)
        }
    };
    let secs = secs as libc::time_t;
    let mut buf = [0 as c_char; 64];
    // SAFETY: ctime_r writes at most 26 bytes into the 64-byte buffer and only reads `secs`.
    let p = unsafe { libc::ctime_r(&secs, buf.as_mut_ptr()) };
    if p.is_null() {
        return secs.to_string();
    }
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

/// `rbd info --format json`'s object (format is always 2: blockd makes no format 1 images
/// and librbd 16 no longer opens them for writing).
pub fn image_info_json(info: &ImageInfo) -> Value {
    let mut v = json!({
        "name": info.name,
        "id": info.id,
        "size": info.size,
        "objects": info.num_objs,
        "order": info.order,
        "object_size": info.obj_size,
        "snapshot_count": info.snapshot_count,
        "block_name_prefix": info.block_name_prefix,
        "format": 2,
        "features": feature_names(info.features),
        "op_features": bit_names(OP_FEATURES, info.op_features),
        "flags": bit_names(FLAGS, info.flags),
        "create_timestamp": ctime(info.create_timestamp),
        "access_timestamp": ctime(info.access_timestamp),
        "modify_timestamp": ctime(info.modify_timestamp),
    });
    if let Some(p) = &info.parent {
        v["parent"] = json!(p);
    }
    v
}

/// `rbd info`'s text.
pub fn print_image_info(info: &ImageInfo) {
    println!("rbd image '{}':", info.name);
    println!("\tsize {} in {} objects", human(info.size), info.num_objs);
    println!("\torder {} ({} objects)", info.order, human(info.obj_size));
    println!("\tsnapshot_count: {}", info.snapshot_count);
    println!("\tid: {}", info.id);
    println!("\tblock_name_prefix: {}", info.block_name_prefix);
    println!("\tformat: 2");
    println!("\tfeatures: {}", feature_names(info.features).join(", "));
    println!(
        "\top_features: {}",
        bit_names(OP_FEATURES, info.op_features).join(", ")
    );
    println!("\tflags: {}", bit_names(FLAGS, info.flags).join(", "));
    println!("\tcreate_timestamp: {}", ctime(info.create_timestamp));
    println!("\taccess_timestamp: {}", ctime(info.access_timestamp));
    println!("\tmodify_timestamp: {}", ctime(info.modify_timestamp));
    if let Some(p) = &info.parent {
        println!("\tparent: {p}");
    }
}

/// When a snapshot was taken, as `rbd snap ls` prints it; empty when librbd could not tell.
pub fn snap_timestamp(s: &SnapInfo) -> String {
    s.timestamp.map(ctime).unwrap_or_default()
}

/// `rbd snap ls --format json`'s object (`protected` is a string there).
pub fn snap_json(s: &SnapInfo) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "size": s.size,
        "protected": s.protected.to_string(),
        "timestamp": snap_timestamp(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn feature_names_both_ways() {
        let bits = parse_features("layering, exclusive-lock,object-map").unwrap();
        assert_eq!(bits, 1 | 4 | 8);
        assert_eq!(
            feature_names(bits),
            ["layering", "exclusive-lock", "object-map"]
        );
        assert_eq!(parse_features("61").unwrap(), 61);
        let e = parse_features("layering,nosuch").unwrap_err();
        assert!(e.message.contains("\"nosuch\""), "{e}");
        assert_eq!(bit_names(FLAGS, 2), ["fast diff invalid"]);
        assert!(bit_names(OP_FEATURES, 0).is_empty());
    }

    #[test]
    fn ctime_is_one_line_and_rounds_down() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = ctime(t);
        assert!(s.len() >= 24 && !s.contains('\n'), "{s:?}");
        assert!(s.ends_with("2023"), "{s:?}");
        assert_eq!(ctime(t + Duration::from_millis(999)), s);
        // Before the epoch a fraction rounds down to the earlier second, as tv_sec does.
        let before = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(ctime(before), ctime(UNIX_EPOCH - Duration::from_secs(1)));
        assert_ne!(ctime(before), ctime(UNIX_EPOCH));
    }

    fn info() -> ImageInfo {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        ImageInfo {
            name: "img".into(),
            id: "abc".into(),
            size: 8 << 20,
            obj_size: 4 << 20,
            num_objs: 2,
            order: 22,
            block_name_prefix: "rbd_data.abc".into(),
            features: 1 | 4,
            op_features: 2,
            flags: 0,
            snapshot_count: 1,
            parent: None,
            create_timestamp: t,
            access_timestamp: t,
            modify_timestamp: t,
        }
    }

    #[test]
    fn rbd_info_json_shape() {
        let mut i = info();
        let v = image_info_json(&i);
        assert_eq!(v["features"], json!(["layering", "exclusive-lock"]));
        assert_eq!(v["op_features"], json!(["clone-child"]));
        assert_eq!(v["flags"], json!([]));
        assert_eq!(
            (v["objects"].as_u64(), v["object_size"].as_u64()),
            (Some(2), Some(4 << 20))
        );
        assert_eq!(v["format"], 2);
        assert_eq!(v["create_timestamp"], ctime(i.create_timestamp));
        assert!(v.get("parent").is_none());
        i.parent = Some("p/a@s".into());
        assert_eq!(image_info_json(&i)["parent"], "p/a@s");
    }

    #[test]
    fn rbd_snap_json_shape() {
        let mut s = SnapInfo {
            id: 4,
            name: "s1".into(),
            size: 1 << 20,
            protected: true,
            timestamp: None,
        };
        let v = snap_json(&s);
        assert_eq!(v["protected"], "true");
        assert_eq!(v["timestamp"], "");
        s.timestamp = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(snap_json(&s)["timestamp"]
            .as_str()
            .unwrap()
            .ends_with("2023"));
    }
}
