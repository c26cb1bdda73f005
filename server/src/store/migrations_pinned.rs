//! Shipped migrations never change: a database records which ones it ran
//! (SQLite by number, refinery by number and checksum), so an edited one
//! is either skipped where it ran already or, on Postgres, refused as
//! divergent at every start. A change to the schema is a new migration.
//! Three shipped files were edited after they landed before this check
//! existed.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Each shipped migration and the first 16 hex digits of its SHA-256.
const PINNED: &[(&str, &str)] = &[
    ("src/store/sqlite/V1__initial.sql", "a95533ca0f392eb6"),
    ("src/store/sqlite/V2__presence.sql", "6d1d66051e5a776e"),
    ("src/store/sqlite/V3__idempotency.sql", "90e2109fd44993ae"),
    ("src/store/sqlite/V4__message_log.sql", "5763c641ff003ee5"),
    ("src/store/sqlite/V5__watermark_log.sql", "7ec2db5cffc546d1"),
    ("src/store/sqlite/V6__group_keys.sql", "11b7686004fa8af6"),
    ("src/store/sqlite/V7__departures.sql", "3d831df768602aff"),
    ("src/store/sqlite/V8__session_ends.sql", "2483b7cb12a8bf6a"),
    ("src/store/sqlite/V9__blocks.sql", "bf248defc717265c"),
    (
        "src/store/sqlite/V10__departures_by_conversation.sql",
        "f296cd9fefc81d80",
    ),
    (
        "src/store/sqlite/V11__history_identity.sql",
        "f4b739cc7cbed4ca",
    ),
    ("src/store/sqlite/V12__media.sql", "f70c448ccc34e590"),
    ("src/store/sqlite/V13__push.sql", "f2de14f200ee5564"),
    (
        "src/store/sqlite/V14__former_members.sql",
        "80f982c3cdf1d8a9",
    ),
    (
        "src/store/sqlite/V15__photo_previews.sql",
        "c0d6d4e76b0c1bc3",
    ),
    (
        "src/store/sqlite/V16__former_member_entries.sql",
        "9c8f322acb77faa9",
    ),
    ("src/store/sqlite/V17__mutes.sql", "9313f05844284729"),
    (
        "src/store/sqlite/V18__cleared_histories.sql",
        "b3715b773893ea5d",
    ),
    ("src/store/sqlite/V19__replies.sql", "de948ca4eb2f65d0"),
    ("src/store/sqlite/V20__unsends.sql", "64588df828128960"),
    ("migrations/postgres/V1__initial.sql", "5dcc721cc018b873"),
    ("migrations/postgres/V2__presence.sql", "3b2f2f2d011302a9"),
    ("migrations/postgres/V3__group_keys.sql", "e2a65111b1b8dfff"),
    ("migrations/postgres/V4__departures.sql", "e672b1c8705bb8f0"),
    (
        "migrations/postgres/V5__session_ends.sql",
        "fc8645e008dab03f",
    ),
    ("migrations/postgres/V6__blocks.sql", "80553e5408a5c60d"),
    (
        "migrations/postgres/V7__closed_direct.sql",
        "177cc49eb4222f8a",
    ),
    (
        "migrations/postgres/V8__departures_by_conversation.sql",
        "9c7d59933aebe68c",
    ),
    (
        "migrations/postgres/V9__history_identity.sql",
        "cba9a9c07c336fea",
    ),
    ("migrations/postgres/V10__media.sql", "68535e6181a2a8b7"),
    ("migrations/postgres/V11__push.sql", "0802a87bc9ed9bfd"),
    (
        "migrations/postgres/V12__former_members.sql",
        "430d380145aac80e",
    ),
    (
        "migrations/postgres/V13__photo_previews.sql",
        "8edb495be8d93ebe",
    ),
    (
        "migrations/postgres/V14__former_member_entries.sql",
        "ed4c194402ac03e3",
    ),
    ("migrations/postgres/V15__mutes.sql", "11620292d8c2ce34"),
    (
        "migrations/postgres/V16__cleared_histories.sql",
        "dd43a0c53ada53a7",
    ),
    ("migrations/postgres/V17__replies.sql", "6d69e25ead01725d"),
    ("migrations/postgres/V18__unsends.sql", "c476d60728bc914e"),
];

#[test]
fn shipped_migrations_are_never_edited() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, pinned) in PINNED {
        let bytes = std::fs::read(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            &digest, pinned,
            "{file} changed after it shipped: revert it and add a new migration"
        );
    }
}

/// Every migration file is pinned, so a new one is pinned once it lands.
#[test]
fn every_migration_is_pinned() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["src/store/sqlite", "migrations/postgres"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !name.ends_with(".sql") {
                continue;
            }
            let file = format!("{dir}/{name}");
            assert!(
                PINNED.iter().any(|(pinned, _)| *pinned == file),
                "{file} is not pinned in {}",
                file!()
            );
        }
    }
}
