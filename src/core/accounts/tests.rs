use std::collections::BTreeSet;

use super::merge::{plan, MergeError};
use super::records::{RecordKind, Records};
use super::*;

fn files(passwd: &str, shadow: &str, group: &str, gshadow: Option<&str>) -> Files {
    Files {
        passwd: Some(passwd.as_bytes().to_vec()),
        shadow: Some(shadow.as_bytes().to_vec()),
        group: Some(group.as_bytes().to_vec()),
        gshadow: gshadow.map(|g| g.as_bytes().to_vec()),
    }
}

/// A leader: root and a system user of its own (uid 105), two users in
/// range, `tac-plus` outside the range but included, alice in `sudo`.
fn leader() -> Files {
    files(
        "root:x:0:0:root:/root:/bin/bash\n\
         postfix:x:105:110::/var/spool/postfix:/usr/sbin/nologin\n\
         alice:x:1000:1000:Alice:/home/alice:/bin/bash\n\
         bob:x:1001:1001:Bob:/home/bob:/bin/bash\n\
         tac-plus:x:64005:64005::/var/lib/tac:/usr/sbin/nologin\n",
        "root:$6$root:19000:0:99999:7:::\n\
         postfix:*:19000:0:99999:7:::\n\
         alice:$6$alice:19000:0:99999:7:::\n\
         bob:$6$bob:19000:0:99999:7:::\n\
         tac-plus:!:19000:0:99999:7:::\n",
        "root:x:0:\n\
         sudo:x:27:alice,postfix\n\
         postfix:x:110:\n\
         alice:x:1000:\n\
         bob:x:1001:\n\
         tac-plus:x:64005:\n",
        Some(
            "root:*::\n\
             sudo:*::alice,postfix\n\
             postfix:!::\n\
             alice:!::\n\
             bob:!::\n\
             tac-plus:!::\n",
        ),
    )
}

/// A follower: its own system users at other ids (postfix 104, a local
/// `mailsvc` 106), `sudo` with a local member, a stale in-range user.
fn follower() -> Files {
    files(
        "root:x:0:0:root:/root:/bin/bash\n\
         postfix:x:104:108::/var/spool/postfix:/usr/sbin/nologin\n\
         mailsvc:x:106:106::/nonexistent:/usr/sbin/nologin\n\
         stale:x:1005:1005::/home/stale:/bin/sh\n",
        "root:$6$froot:19000:0:99999:7:::\n\
         postfix:*:19000:0:99999:7:::\n\
         mailsvc:*:19000:0:99999:7:::\n\
         stale:$6$stale:19000:0:99999:7:::\n",
        "root:x:0:\n\
         sudo:x:27:mailsvc,stale\n\
         postfix:x:108:\n\
         mailsvc:x:106:\n\
         stale:x:1005:\n",
        Some(
            "root:*::\n\
             sudo:*::mailsvc,stale\n\
             postfix:!::\n\
             mailsvc:!::\n\
             stale:!::\n",
        ),
    )
}

fn policy() -> Policy {
    Policy {
        include: ["tac-plus".to_string()].into(),
        ..Policy::default()
    }
}

fn text(b: &Option<Vec<u8>>) -> String {
    String::from_utf8(b.clone().unwrap_or_default()).unwrap()
}

/// The files after applying every step of a plan.
fn applied(local: &Files, steps: &[(DbFile, Vec<u8>)]) -> Files {
    let mut f = local.clone();
    for (file, bytes) in steps {
        *f.slot(*file) = Some(bytes.clone());
    }
    f
}

fn names(t: &str, file: DbFile) -> Vec<String> {
    Table::parse(file, t.as_bytes())
        .entries()
        .map(|(_, f)| f[0].clone())
        .collect()
}

#[test]
fn lines_are_parsed_whole_or_kept_as_they_are() {
    let t = Table::parse(
        DbFile::Passwd,
        b"root:x:0:0:root:/root:/bin/bash\n# a comment\n+@netgroup\n\nshort:x:1:1\nbad:x:abc:1::/:/bin/sh\nnul:x:1\0:1::/:/bin/sh\n\xff\xfe:x:1:1::/:/\n",
    );
    assert_eq!(t.lines.len(), 8);
    assert!(t.lines[0].entry().is_some());
    assert_eq!(t.lines[1].kind, LineKind::Other);
    assert_eq!(t.lines[2].kind, LineKind::Other);
    assert_eq!(t.lines[3].kind, LineKind::Other);
    let p: Vec<String> = t.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        p,
        [
            "passwd line 5: has 4 fields where passwd has 7",
            "passwd line 6: user id \"abc\" is not a number",
            "passwd line 7: contains a NUL byte",
            "passwd line 8: is not valid UTF-8",
        ]
    );
    // The name of a malformed line still counts as taken.
    assert_eq!(t.lines[4].name(), Some("short"));
    // Rendering gives back the same bytes, bad lines included.
    let again = Table::parse(DbFile::Passwd, &t.render());
    assert_eq!(again, t);

    let long = format!("u:x:1:1:{}:/:/bin/sh\n", "g".repeat(MAX_LINE));
    assert!(Table::parse(DbFile::Passwd, long.as_bytes()).problems()[0]
        .why
        .contains("longer than"));
    let g = Table::parse(DbFile::Group, b"g:x:10:a,b c\n");
    assert_eq!(g.problems()[0].why, "member \"b c\" is not a valid name");
    assert!(Table::parse(DbFile::Shadow, b"u:x:1:2:3\n").problems()[0]
        .why
        .contains("9"));
}

#[test]
fn ranges_parse_and_refuse_nonsense() {
    assert_eq!(IdRange::parse("1000-59999"), Ok(DEFAULT_RANGE));
    assert_eq!(IdRange::parse("5-5").map(|r| r.contains(5)), Ok(true));
    assert!(IdRange::parse("59999-1000")
        .unwrap_err()
        .contains("starts after it ends"));
    assert!(IdRange::parse("1000").unwrap_err().contains("FIRST-LAST"));
    assert!(IdRange::parse("a-9").unwrap_err().contains("not a number"));
    assert!(IdRange::parse("0-99999999999")
        .unwrap_err()
        .contains("too large"));
}

#[test]
fn the_leader_replicates_governed_entries_and_memberships_only() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let users: Vec<&str> = r.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(users, ["alice", "bob", "tac-plus"]);
    assert_eq!(r.users[0].shadow, "alice:$6$alice:19000:0:99999:7:::");
    let groups: Vec<&str> = r.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(groups, ["alice", "bob", "tac-plus"]);
    let sudo = r.memberships.iter().find(|m| m.group == "sudo").unwrap();
    // postfix is the leader's own: not replicated as a member.
    assert_eq!(sudo.members, ["alice"]);
    assert_eq!(sudo.gmembers, ["alice"]);
    // Every group the leader does not govern is listed, so a follower can
    // tell "no governed member" from "no such group on the leader".
    assert!(r
        .memberships
        .iter()
        .any(|m| m.group == "root" && m.members.is_empty()));

    // The view round-trips, and is the same whatever the order of lines.
    let view = r.render();
    let back =
        Records::from_view(|n| view.iter().find(|(f, _)| *f == n).map(|(_, b)| b.clone())).unwrap();
    assert_eq!(back, r);
    let mut shuffled = leader();
    let pw = text(&shuffled.passwd);
    let mut lines: Vec<&str> = pw.lines().collect();
    lines.reverse();
    shuffled.passwd = Some(format!("{}\n", lines.join("\n")).into_bytes());
    assert_eq!(
        Records::extract(&shuffled, &policy()).unwrap().render(),
        view
    );
}

#[test]
fn a_half_written_useradd_or_a_damaged_line_on_the_leader_sends_nothing() {
    // useradd writes passwd, then shadow: caught between the two.
    let mut f = leader();
    f.passwd = Some(
        [
            f.passwd.clone().unwrap(),
            b"carol:x:1002:1002::/home/carol:/bin/bash\n".to_vec(),
        ]
        .concat(),
    );
    let e = Records::extract(&f, &policy()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("passwd line 6: user \"carol\" has no entry in shadow"),
        "{e}"
    );

    let mut f = leader();
    f.group = Some([f.group.clone().unwrap(), b"devs:x:1600:alice\n".to_vec()].concat());
    let e = Records::extract(&f, &policy()).unwrap_err();
    assert!(
        e.to_string()
            .contains("group line 7: group \"devs\" has no entry in gshadow"),
        "{e}"
    );

    let mut f = leader();
    f.passwd = Some(
        [
            f.passwd.clone().unwrap(),
            b"badline:x:notanumber:1000::/:/bin/sh\n".to_vec(),
        ]
        .concat(),
    );
    let e = Records::extract(&f, &policy()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "passwd line 6: user id \"notanumber\" is not a number"
    );

    let mut f = leader();
    f.passwd = Some(
        [
            f.passwd.clone().unwrap(),
            b"alias:x:1000:1000::/:/bin/sh\n".to_vec(),
        ]
        .concat(),
    );
    f.shadow = Some(
        [
            f.shadow.clone().unwrap(),
            b"alias:!:1:0:99999:7:::\n".to_vec(),
        ]
        .concat(),
    );
    let e = Records::extract(&f, &policy()).unwrap_err();
    assert!(
        e.to_string()
            .contains("user id 1000 of \"alias\" is also used on line 3"),
        "{e}"
    );

    let mut f = leader();
    f.shadow = None;
    assert_eq!(
        Records::extract(&f, &policy()).unwrap_err().to_string(),
        "shadow does not exist"
    );
}

#[test]
fn a_follower_gains_the_records_and_keeps_its_own_entries() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let local = follower();
    let p = plan(&local, &r, &policy()).unwrap();
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(p.added, ["alice", "bob", "tac-plus"]);
    assert_eq!(p.removed, ["stale"]);
    let out = applied(&local, &p.steps);
    let pw = text(&out.passwd);
    // Its own system users are byte for byte what they were, where they were.
    assert!(pw.starts_with(
        "root:x:0:0:root:/root:/bin/bash\n\
         postfix:x:104:108::/var/spool/postfix:/usr/sbin/nologin\n\
         mailsvc:x:106:106::/nonexistent:/usr/sbin/nologin\n"
    ));
    assert_eq!(
        names(&pw, DbFile::Passwd),
        ["root", "postfix", "mailsvc", "alice", "bob", "tac-plus"]
    );
    assert!(text(&out.shadow).contains("alice:$6$alice:19000"));
    assert!(
        text(&out.shadow).contains("root:$6$froot:"),
        "the follower's root hash stays its own"
    );
    let gr = text(&out.group);
    // sudo: the local member stays, the removed in-range one goes, the
    // leader's governed member comes.
    assert!(gr.contains("sudo:x:27:mailsvc,alice\n"), "{gr}");
    assert!(gr.contains("postfix:x:108:\n"));
    assert!(text(&out.gshadow).contains("sudo:*::mailsvc,alice\n"));
    assert!(!text(&out.gshadow).contains("stale"));

    // Merging again changes nothing.
    let again = plan(&out, &r, &policy()).unwrap();
    assert!(again.steps.is_empty(), "{:?}", again.steps);
    // And the leader's own files already are the merge of its records.
    assert!(plan(&leader(), &r, &policy()).unwrap().steps.is_empty());
}

/// At every instant the steps leave, every user of passwd has a shadow
/// entry and every group of group a gshadow entry.
fn assert_every_instant_consistent(local: &Files, steps: &[(DbFile, Vec<u8>)]) {
    let mut now = local.clone();
    for (i, (file, bytes)) in steps.iter().enumerate() {
        *now.slot(*file) = Some(bytes.clone());
        let pw = names(&text(&now.passwd), DbFile::Passwd);
        let sh: BTreeSet<String> = names(&text(&now.shadow), DbFile::Shadow)
            .into_iter()
            .collect();
        for u in pw {
            assert!(
                sh.contains(&u),
                "after step {i} ({file}), user {u} has no shadow entry"
            );
        }
        let gr = names(&text(&now.group), DbFile::Group);
        let gs: BTreeSet<String> = names(&text(&now.gshadow), DbFile::Gshadow)
            .into_iter()
            .collect();
        for g in gr {
            assert!(
                gs.contains(&g),
                "after step {i} ({file}), group {g} has no gshadow entry"
            );
        }
    }
}

#[test]
fn new_users_reach_shadow_first_and_removed_ones_leave_passwd_first() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let local = follower();
    let p = plan(&local, &r, &policy()).unwrap();
    let order: Vec<DbFile> = p.steps.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        order,
        [
            DbFile::Shadow,
            DbFile::Gshadow,
            DbFile::Group,
            DbFile::Passwd,
            DbFile::Group,
            DbFile::Shadow,
            DbFile::Gshadow
        ]
    );
    assert_every_instant_consistent(&local, &p.steps);

    // Only additions: shadow before passwd, nothing written twice.
    let merged = applied(&local, &p.steps);
    let mut more = leader();
    more.passwd = Some(
        [
            more.passwd.clone().unwrap(),
            b"carol:x:1002:1002::/home/carol:/bin/bash\n".to_vec(),
        ]
        .concat(),
    );
    more.shadow = Some(
        [
            more.shadow.clone().unwrap(),
            b"carol:$6$carol:19000:0:99999:7:::\n".to_vec(),
        ]
        .concat(),
    );
    let r2 = Records::extract(&more, &policy()).unwrap();
    let p2 = plan(&merged, &r2, &policy()).unwrap();
    let order: Vec<DbFile> = p2.steps.iter().map(|(f, _)| *f).collect();
    assert_eq!(order, [DbFile::Shadow, DbFile::Passwd]);
    assert_every_instant_consistent(&merged, &p2.steps);

    // Only a removal: passwd first, then shadow.
    let back = applied(&merged, &p2.steps);
    let p3 = plan(&back, &r, &policy()).unwrap();
    let order: Vec<DbFile> = p3.steps.iter().map(|(f, _)| *f).collect();
    assert_eq!(order, [DbFile::Passwd, DbFile::Shadow]);
    assert_eq!(p3.removed, ["carol"]);
    assert_every_instant_consistent(&back, &p3.steps);
}

#[test]
fn a_record_colliding_with_a_local_entry_is_refused_and_the_local_entry_kept() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let mut local = follower();
    // A local system user named like a replicated one, at its own id.
    local.passwd = Some(
        [
            local.passwd.clone().unwrap(),
            b"bob:x:152:152::/srv/bob:/usr/sbin/nologin\n".to_vec(),
        ]
        .concat(),
    );
    local.shadow = Some(
        [
            local.shadow.clone().unwrap(),
            b"bob:*:19000:0:99999:7:::\n".to_vec(),
        ]
        .concat(),
    );
    // A local system user on the id of an included one.
    local.passwd = Some(
        [
            local.passwd.clone().unwrap(),
            b"tacsvc:x:64005:64005::/:/usr/sbin/nologin\n".to_vec(),
        ]
        .concat(),
    );
    local.shadow = Some(
        [
            local.shadow.clone().unwrap(),
            b"tacsvc:*:19000:0:99999:7:::\n".to_vec(),
        ]
        .concat(),
    );
    local.group = Some([local.group.clone().unwrap(), b"tacsvc:x:64005:\n".to_vec()].concat());
    local.gshadow = Some([local.gshadow.clone().unwrap(), b"tacsvc:!::\n".to_vec()].concat());
    let p = plan(&local, &r, &policy()).unwrap();
    let refused: Vec<(RecordKind, &str)> = p
        .refused
        .iter()
        .map(|x| (x.kind, x.name.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            (RecordKind::Group, "tac-plus"),
            (RecordKind::User, "bob"),
            (RecordKind::User, "tac-plus")
        ]
    );
    assert!(
        p.refused[1].reason.contains("own user \"bob\" with id 152"),
        "{}",
        p.refused[1]
    );
    assert!(
        p.refused[2]
            .reason
            .contains("id 64005 is this node's own user \"tacsvc\""),
        "{}",
        p.refused[2]
    );
    let out = applied(&local, &p.steps);
    let pw = text(&out.passwd);
    assert!(pw.contains("bob:x:152:152::/srv/bob:/usr/sbin/nologin\n"));
    assert!(!pw.contains("bob:x:1001"));
    assert!(pw.contains("tacsvc:x:64005:"));
    assert!(!pw.contains("tac-plus"));
    assert!(text(&out.shadow).contains("bob:*:19000"));
    assert!(pw.contains("alice:x:1000:"));
    assert_every_instant_consistent(&local, &p.steps);

    // A refused group takes the users whose primary group it is with it.
    let mut local = follower();
    local.group = Some([local.group.clone().unwrap(), b"alice:x:150:\n".to_vec()].concat());
    local.gshadow = Some([local.gshadow.clone().unwrap(), b"alice:!::\n".to_vec()].concat());
    let p = plan(&local, &r, &policy()).unwrap();
    let alice = p
        .refused
        .iter()
        .find(|x| x.kind == RecordKind::User)
        .unwrap();
    assert_eq!(alice.name, "alice");
    assert!(alice
        .reason
        .contains("primary group \"alice\" (gid 1000) was refused"));
    assert!(!text(&applied(&local, &p.steps).passwd).contains("alice"));
}

#[test]
fn a_followers_own_malformed_lines_are_kept_and_reported() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let mut local = follower();
    let odd = "weird:x:12:12:no shell field\n";
    local.passwd = Some([local.passwd.clone().unwrap(), odd.as_bytes().to_vec()].concat());
    let p = plan(&local, &r, &policy()).unwrap();
    assert_eq!(p.local_malformed.len(), 1);
    assert_eq!(
        p.local_malformed[0].to_string(),
        "passwd line 5: has 5 fields where passwd has 7"
    );
    let out = applied(&local, &p.steps);
    assert!(text(&out.passwd).contains(odd));

    // A malformed line holding a replicated name blocks that record.
    let mut local = follower();
    local.passwd = Some(
        [
            local.passwd.clone().unwrap(),
            b"alice:x:1000:1000\n".to_vec(),
        ]
        .concat(),
    );
    let p = plan(&local, &r, &policy()).unwrap();
    assert!(p
        .refused
        .iter()
        .any(|x| x.name == "alice" && x.reason.contains("malformed line")));
    assert!(text(&applied(&local, &p.steps).passwd).contains("alice:x:1000:1000\n"));
}

#[test]
fn a_leader_without_gshadow_and_a_follower_with_one() {
    let mut l = leader();
    l.gshadow = None;
    let r = Records::extract(&l, &policy()).unwrap();
    assert!(r.groups.iter().all(|g| g.gshadow.is_none()));
    let p = plan(&follower(), &r, &policy()).unwrap();
    let out = applied(&follower(), &p.steps);
    assert!(text(&out.gshadow).contains("alice:!::\n"));
    assert!(text(&out.gshadow).contains("sudo:*::mailsvc,alice\n"));

    // A follower without gshadow does not get one.
    let mut f = follower();
    f.gshadow = None;
    let p = plan(
        &f,
        &Records::extract(&leader(), &policy()).unwrap(),
        &policy(),
    )
    .unwrap();
    assert!(p.steps.iter().all(|(file, _)| *file != DbFile::Gshadow));
    f.passwd = None;
    assert_eq!(
        plan(&f, &r, &policy()).unwrap_err(),
        MergeError::Missing(DbFile::Passwd)
    );
}

#[test]
fn memberships_of_groups_the_leader_lacks_stay_as_they_are() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let mut local = follower();
    local.group = Some(
        [
            local.group.clone().unwrap(),
            b"tacacs:x:140:mailsvc,alice\n".to_vec(),
        ]
        .concat(),
    );
    local.gshadow = Some(
        [
            local.gshadow.clone().unwrap(),
            b"tacacs:!::mailsvc,alice\n".to_vec(),
        ]
        .concat(),
    );
    let out = applied(&local, &plan(&local, &r, &policy()).unwrap().steps);
    assert!(text(&out.group).contains("tacacs:x:140:mailsvc,alice\n"));
}

#[test]
fn a_removed_user_leaves_groups_only_this_node_has() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    let mut local = follower();
    local.group = Some(
        [
            local.group.clone().unwrap(),
            b"docker:x:999:stale,mailsvc\n".to_vec(),
        ]
        .concat(),
    );
    local.gshadow = Some(
        [
            local.gshadow.clone().unwrap(),
            b"docker:!:stale:stale,mailsvc\n".to_vec(),
        ]
        .concat(),
    );
    let out = applied(&local, &plan(&local, &r, &policy()).unwrap().steps);
    assert!(
        text(&out.group).contains("docker:x:999:mailsvc\n"),
        "{}",
        text(&out.group)
    );
    assert!(text(&out.gshadow).contains("docker:!::mailsvc\n"));
}

#[test]
fn records_outside_this_nodes_policy_are_refused() {
    let r = Records::extract(&leader(), &policy()).unwrap();
    // This node does not include tac-plus: its settings differ.
    let p = plan(&follower(), &r, &Policy::default()).unwrap();
    let names: Vec<&str> = p.refused.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["tac-plus", "tac-plus"]);
    assert!(p.refused[0]
        .reason
        .contains("make the accounts settings the same on every node"));
    assert!(!text(&applied(&follower(), &p.steps).passwd).contains("tac-plus"));
}

#[test]
fn a_new_leader_keeps_the_records_a_collision_kept_off_its_files() {
    let committed = Records::extract(&leader(), &policy()).unwrap();
    // The follower refused bob; as leader its files lack bob.
    let mut own = leader();
    own.passwd = Some(
        text(&own.passwd)
            .replace("bob:x:1001:1001:Bob:/home/bob:/bin/bash\n", "")
            .into_bytes(),
    );
    own.shadow = Some(
        text(&own.shadow)
            .replace("bob:$6$bob:19000:0:99999:7:::\n", "")
            .into_bytes(),
    );
    let mut r = Records::extract(&own, &policy()).unwrap();
    assert_eq!(r.removed_users(&committed), ["bob"]);
    r.keep_refused(&committed, &[(RecordKind::User, "bob".to_string())].into());
    assert!(r.removed_users(&committed).is_empty());
    assert_eq!(r.user("bob"), committed.user("bob"));
}

#[test]
fn a_damaged_view_is_refused() {
    let e = Records::from_view(|n| match n {
        "passwd" => Some(b"alice:x:1000:1000::/:/bin/sh\n".to_vec()),
        _ => None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("user \"alice\" has no shadow entry"));
    let e = Records::from_view(|n| match n {
        "memberships" => Some(b"sudo:alice\n".to_vec()),
        _ => None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("memberships line 1"));
    assert_eq!(Records::from_view(|_| None).unwrap(), Records::default());
}
