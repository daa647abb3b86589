//! The translator: walks a script's commands, follows its `if` frames and
//! lock checks, and collects each path's uses into a `[[sync]]` draft.

use super::*;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Pull,
    Push,
}

#[derive(Debug, Clone)]
pub(super) struct LockGuard {
    /// Directory the lock test looks in.
    pub(super) dir: String,
    /// The lock file name or glob (`*.lock`).
    pub(super) pattern: String,
    /// `!` in front: the then-branch is the "no lock" branch.
    pub(super) negated: bool,
    pub(super) line: usize,
}

#[derive(Debug)]
pub(super) enum Frame {
    If {
        lock: Option<LockGuard>,
        text: String,
        in_else: bool,
        used: bool,
    },
    Loop,
}

/// One rsync line's contribution to a set.
#[derive(Debug)]
pub(super) struct Use {
    pub(super) line: usize,
    pub(super) direction: Direction,
    pub(super) peer: String,
    pub(super) local: String,
    pub(super) directory: bool,
    pub(super) excludes: Vec<String>,
    /// The line passed --delete or a variant.
    pub(super) delete: bool,
    /// The line passed -H.
    pub(super) hard_links: bool,
    /// The line passed -A or -X.
    pub(super) xattrs: bool,
}

#[derive(Debug)]
pub(super) struct SetAcc {
    pub(super) path: String,
    pub(super) uses: Vec<Use>,
    /// (pattern, lock location as tested, line)
    pub(super) guards: Vec<(String, String, usize)>,
    /// Every lock check around the set's lines, inside the set or not: (lock location as tested, line).
    pub(super) lock_checks: Vec<(String, usize)>,
    /// Comments from the lines, in line order.
    pub(super) comments: Vec<LineComment>,
}

/// A comment from an rsync line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LineComment {
    pub(super) text: String,
    /// Only about copying files (excludes, `--delete`, lock checks, where rsync put a
    /// file): an accounts set, which replicates records, drops it.
    pub(super) file_copy: bool,
}

/// A note whose wording depends on what the rest of the script shows.
#[derive(Debug)]
pub(super) enum Pending {
    Done(String),
    /// ping / PROMOTE logic; the reason names the role_file found anywhere in the script.
    Leader(String),
    /// `NAME=value`; the reason depends on where NAME was used.
    Assignment {
        text: String,
        name: String,
    },
}

#[derive(Debug, Default)]
pub(super) struct Translator {
    pub(super) stack: Vec<Frame>,
    pub(super) vars: HashMap<String, String>,
    pub(super) promote_vars: HashSet<String>,
    pub(super) vars_as_host: HashSet<String>,
    pub(super) vars_in_path: HashSet<String>,
    pub(super) cwd: Option<String>,
    pub(super) last_was_ping: bool,
    pub(super) promote_file: Option<String>,
    pub(super) peers: Vec<String>,
    pub(super) rsync_lines: usize,
    pub(super) notes: Vec<Pending>,
    pub(super) sets: Vec<SetAcc>,
}

impl Translator {
    pub(super) fn note(&mut self, text: &str, why: &str) {
        self.notes
            .push(Pending::Done(format!("not translated: {text} ({why})")));
    }

    pub(super) fn line(&mut self, no: usize, text: &str) {
        let segs = split_commands(text);
        let mut i = 0;
        while i < segs.len() {
            let seg = &segs[i];
            i += 1;
            let words = match words_of(&seg.text) {
                Ok(w) => w,
                Err(e) => {
                    self.note(&seg.text, &e.to_string());
                    continue;
                }
            };
            let Some(first) = words.first().map(String::as_str) else {
                continue;
            };
            if matches!(first, "if" | "elif" | "while" | "until") {
                // The condition runs up to the next `;` or end of line.
                let mut text = seg.text.clone();
                let mut conds = vec![strip_redirections(words[1..].to_vec()).0];
                let mut sep = seg.sep;
                while matches!(sep, Sep::And | Sep::Or | Sep::Pipe) && i < segs.len() {
                    let _ = write!(text, " {} {}", sep.as_str(), segs[i].text);
                    conds.extend(command_words(&segs[i].text));
                    sep = segs[i].sep;
                    i += 1;
                }
                self.condition(no, first, &text, &conds);
                continue;
            }
            self.command(no, &seg.text, words);
        }
    }

    /// `if`/`elif`/`while`/`until` with its condition commands.
    pub(super) fn condition(
        &mut self,
        no: usize,
        keyword: &str,
        text: &str,
        conds: &[Vec<String>],
    ) {
        let lock = if matches!(keyword, "if" | "elif") {
            self.lock_check(no, conds)
        } else {
            None
        };
        // `if ! rsync ...; then`: the rsync line is translated like any other.
        let mut others = Vec::new();
        for cond in conds {
            let bang = cond.iter().take_while(|w| *w == "!").count();
            let cmd = strip_prefixes(&cond[bang..]);
            if classify(cmd) == Action::Rsync {
                self.rsync(no, &shell_words::join(cmd), cmd);
            } else {
                others.push(cond.clone());
            }
        }
        if lock.is_none() && !others.is_empty() {
            self.condition_note(text, &others);
        }
        match keyword {
            "elif" => {
                if let Some(Frame::If { .. }) = self.stack.last() {
                    self.close_if();
                }
                self.stack.push(Frame::If {
                    lock,
                    text: text.to_string(),
                    in_else: false,
                    used: false,
                });
            }
            "if" => self.stack.push(Frame::If {
                lock,
                text: text.to_string(),
                in_else: false,
                used: false,
            }),
            _ => self.stack.push(Frame::Loop),
        }
    }

    pub(super) fn condition_note(&mut self, text: &str, conds: &[Vec<String>]) {
        let mentions_var = |name: &str| {
            text.contains(&format!("${name}")) || text.contains(&format!("${{{name}}}"))
        };
        let leader = (text.contains("$?") && self.last_was_ping)
            || text.contains("PROMOTE")
            || self.promote_vars.iter().any(|v| mentions_var(v))
            || conds.iter().any(|c| classify(c) == Action::Ping);
        if leader {
            self.notes.push(Pending::Leader(text.to_string()));
        } else {
            self.note(text, "condition dropped: the rsync lines under it were translated as if every branch ran");
        }
    }

    /// Recognises `[ -f DIR/*.lock ]`, `test -e ...`, `ls DIR/*.lock`, also run over ssh and with `!`.
    pub(super) fn lock_check(&self, no: usize, conds: &[Vec<String>]) -> Option<LockGuard> {
        for cond in conds {
            let mut words: Vec<String> = cond.clone();
            let mut negated = false;
            while words.first().is_some_and(|w| w == "!") {
                negated = !negated;
                words.remove(0);
            }
            if words.first().is_some_and(|w| basename(w) == "ssh") {
                let (_, remote) = ssh_parts(&words)?;
                words = command_words(&remote.join(" ")).into_iter().next()?;
                while words.first().is_some_and(|w| w == "!") {
                    negated = !negated;
                    words.remove(0);
                }
            }
            let operand = match words.first().map(String::as_str) {
                Some("[" | "[[" | "test") => {
                    let mut operand = None;
                    let mut k = 1;
                    while k < words.len() {
                        match words[k].as_str() {
                            "!" => negated = !negated,
                            "-f" | "-e" | "-s" | "-L" | "-h" => {
                                operand = words.get(k + 1).cloned();
                                break;
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                    operand
                }
                Some("ls") => words.iter().skip(1).find(|w| !w.starts_with('-')).cloned(),
                _ => None,
            };
            let Some(operand) = operand else { continue };
            let (dir, pattern) = match operand.rsplit_once('/') {
                Some((d, p)) => (
                    if d.is_empty() {
                        "/".to_string()
                    } else {
                        d.to_string()
                    },
                    p.to_string(),
                ),
                None => (self.cwd.clone()?, operand.clone()),
            };
            if pattern.to_ascii_lowercase().contains("lock") && dir.starts_with('/') {
                let (dir, _) = self.expand(&dir);
                return Some(LockGuard {
                    dir: clean_path(&dir),
                    pattern,
                    negated,
                    line: no,
                });
            }
        }
        None
    }

    /// Pops the innermost `if`, noting a lock check that guarded no rsync line.
    pub(super) fn close_if(&mut self) {
        if let Some(Frame::If {
            lock: Some(_),
            text,
            used: false,
            ..
        }) = self.stack.pop()
        {
            self.note(&text, "lock check that guards no rsync line");
        }
    }

    pub(super) fn command(&mut self, no: usize, text: &str, words: Vec<String>) {
        let (words, redirects) = strip_redirections(words);
        let Some(first) = words.first().map(String::as_str) else {
            return;
        };
        match first {
            "then" | "else" | "do" => {
                if first == "else" {
                    if let Some(Frame::If { in_else, .. }) = self.stack.last_mut() {
                        *in_else = true;
                    }
                }
                let rest = match text.trim_start().strip_prefix(first) {
                    Some(rest) => rest.trim().to_string(),
                    None => shell_words::join(&words[1..]),
                };
                if !rest.is_empty() {
                    self.line(no, &rest);
                }
                return;
            }
            "fi" => {
                if let Some(Frame::If { .. }) = self.stack.last() {
                    self.close_if();
                }
                return;
            }
            "done" => {
                if let Some(Frame::Loop) = self.stack.last() {
                    self.stack.pop();
                }
                return;
            }
            "for" | "select" => {
                self.stack.push(Frame::Loop);
                return;
            }
            "{" | "}" | "esac" => return,
            _ => {}
        }

        // Assignments, alone or in front of a command.
        if let Some((name, value)) = assignment(first) {
            let whole = text.split_once('=').map(|(_, v)| v).unwrap_or(value);
            if value.starts_with("$(") || value.starts_with('`') || whole.contains("PROMOTE") {
                self.last_was_ping = false;
                if whole.contains("PROMOTE") {
                    self.promote_vars.insert(name.to_string());
                    self.see_promote(text);
                    self.notes.push(Pending::Leader(text.to_string()));
                } else {
                    self.note(text, "shell variable set from a command");
                }
                return;
            }
            if words.len() == 1 {
                self.vars.insert(name.to_string(), value.to_string());
                self.notes.push(Pending::Assignment {
                    text: text.to_string(),
                    name: name.to_string(),
                });
                return;
            }
        }
        let start = words.iter().take_while(|w| assignment(w).is_some()).count();
        let words = &words[start..];
        let action = classify(words);
        self.last_was_ping = action == Action::Ping;

        if action != Action::Rsync && action != Action::Ssh && text.contains("PROMOTE") {
            self.see_promote(text);
            self.notes.push(Pending::Leader(text.to_string()));
            return;
        }
        match action {
            Action::Rsync => self.rsync(no, text, strip_prefixes(words)),
            Action::Ssh => self.ssh(text, strip_prefixes(words)),
            Action::Silent => {
                if let Some(t) = redirects.iter().find(|t| !t.starts_with("/dev/")) {
                    self.note(text, &format!("writes {t}; not translated"));
                }
            }
            Action::Reboot => self.note(text, "clusterd never reboots nodes; use on_change"),
            Action::Reload => self.suggest_on_change(text, strip_prefixes(words)),
            Action::Lockfile => self.note(text, "lock against overlapping runs of the old script; clusterd runs continuously"),
            Action::Ownership => self.note(
                text,
                "clusterd replicates owner, group and mode with every file; a fix-up that must still run after a sync belongs in on_change",
            ),
            Action::Ping => self.notes.push(Pending::Leader(text.to_string())),
            Action::Cd => {
                if let Some(dir) = words.get(1).filter(|d| d.starts_with('/')) {
                    self.cwd = Some(clean_path(&self.expand(dir).0));
                }
                self.note(text, "working directory of the old script; clusterd needs none");
            }
            Action::Other => self.note(text, "unrecognised command; review it by hand"),
        }
    }

    pub(super) fn suggest_on_change(&mut self, text: &str, cmd: &[String]) {
        let cmd = shell_words::join(cmd);
        self.notes.push(Pending::Done(format!(
            "suggested on_change = {} (from: {text}; put it on the set whose files that service reads)",
            toml_string(&cmd)
        )));
    }

    pub(super) fn ssh(&mut self, text: &str, words: &[String]) {
        let Some((_, remote)) = ssh_parts(words).filter(|(_, r)| !r.is_empty()) else {
            self.note(text, "ssh without a command");
            return;
        };
        let cmds = command_words(&remote.join(" "));
        let actions: Vec<Action> = cmds.iter().map(|c| classify(c)).collect();
        let mut handled = false;
        for (cmd, action) in cmds.iter().zip(&actions) {
            if *action == Action::Reload {
                self.suggest_on_change(text, strip_prefixes(cmd));
                handled = true;
            }
        }
        if actions.contains(&Action::Reboot) {
            self.note(text, "clusterd never reboots nodes; use on_change");
        } else if text.contains("PROMOTE") {
            self.see_promote(text);
            self.notes.push(Pending::Leader(text.to_string()));
        } else if !handled {
            let why = match actions.iter().find(|a| **a != Action::Silent) {
                Some(Action::Lockfile) => "ssh command: a lock on the peer around the copy; clusterd replaces each file atomically, and skip_while leaves a set alone while the application's own lock files exist",
                Some(Action::Ownership) => "ssh command: clusterd replicates owner, group and mode with every file; a fix-up that must still run after a sync belongs in on_change",
                _ => "ssh command: clusterd runs no commands on other nodes; on_change runs one on each follower after it applied a batch",
            };
            self.note(text, why);
        }
    }

    /// Remembers where the PROMOTE file lives (resolved against the last `cd`).
    pub(super) fn see_promote(&mut self, text: &str) {
        if self.promote_file.is_some() {
            return;
        }
        let piece = text
            .split(|c: char| c.is_whitespace() || "()$;'\"<>=`|&".contains(c))
            .find(|p| p.contains("PROMOTE"));
        if let Some(p) = piece {
            let p = self.expand(p).0;
            self.promote_file = Some(if p.starts_with('/') {
                clean_path(&p)
            } else if let Some(cwd) = &self.cwd {
                clean_path(&format!("{cwd}/{p}"))
            } else {
                p
            });
        }
    }

    /// Expands `$NAME` and `${NAME}` with the script's plain assignments; returns the names used.
    pub(super) fn expand(&self, s: &str) -> (String, Vec<String>) {
        let mut out = String::new();
        let mut used = Vec::new();
        let mut rest = s;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            let (name, len) = if let Some(inner) = after.strip_prefix('{') {
                match inner.find('}') {
                    Some(end) => (&inner[..end], end + 2),
                    None => ("", 0),
                }
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            };
            match self.vars.get(name).filter(|_| is_identifier(name)) {
                Some(v) => {
                    out.push_str(v);
                    used.push(name.to_string());
                }
                None => out.push_str(&rest[pos..pos + 1 + len]),
            }
            rest = &after[len..];
        }
        out.push_str(rest);
        (out, used)
    }

    pub(super) fn rsync(&mut self, no: usize, text: &str, words: &[String]) {
        self.rsync_lines += 1;
        let args = parse_rsync_args(words);
        if args.operands.len() < 2 {
            self.note(text, "an rsync line needs a source and a destination");
            return;
        }
        let ops: Vec<Operand> = args.operands.iter().map(|o| parse_operand(o)).collect();
        if ops.iter().any(|o| o.daemon) {
            self.note(text, "rsync daemon transfers (host::module, rsync://) are not translated; make a set of the module's real path");
            return;
        }
        let last = ops.len() - 1;
        let remotes: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].peer.is_some()).collect();
        let mut odd = None;
        let (direction, pairs): (Direction, Vec<(usize, usize)>) = match remotes.as_slice() {
            [] => {
                self.note(
                    text,
                    "neither side is remote: a local copy, not a sync between nodes",
                );
                return;
            }
            [r] if *r == last => (Direction::Push, (0..last).map(|s| (last, s)).collect()),
            [0] => {
                if last > 1 {
                    let extra = shell_words::join(&args.operands[1..last]);
                    odd = Some(format!(
                        "line {no} has extra operand(s) {extra} between the remote source and the destination; rsync rejects such a line (\"Unexpected local arg\"); they were ignored"
                    ));
                }
                (Direction::Pull, vec![(0, last)])
            }
            [r] => {
                let extra = shell_words::join(&args.operands[r + 1..]);
                odd = Some(format!(
                    "line {no} has extra operand(s) {extra} after the remote destination; rsync rejects such a line (\"Unexpected remote arg\"), so the old script never ran this copy; read as a push to {}, the extra operand(s) ignored",
                    args.operands[*r]
                ));
                (Direction::Push, (0..*r).map(|s| (*r, s)).collect())
            }
            rs if rs.len() == last => (Direction::Pull, rs.iter().map(|&r| (r, last)).collect()),
            _ => {
                self.note(text, "more than one remote side (remote to remote, or remote and local sources mixed)");
                return;
            }
        };

        let mut line_comments = Vec::new();
        line_comments.extend(odd);
        if !args.unknown.is_empty() {
            line_comments.push(format!(
                "line {no}: rsync option(s) not translated, review by hand: {}",
                args.unknown.join(", ")
            ));
        }

        let guards: Vec<LockGuard> = self
            .stack
            .iter_mut()
            .filter_map(|f| match f {
                Frame::If {
                    lock: Some(l),
                    in_else,
                    used,
                    ..
                } if *in_else != l.negated => {
                    *used = true;
                    Some(l.clone())
                }
                _ => None,
            })
            .collect();

        for (ri, li) in pairs {
            let remote = &ops[ri];
            let local = &ops[li];
            let mut comments = line_comments.clone();
            // Comments that only concern copying the files; see LineComment.
            let mut copy_comments = Vec::new();
            let (rpath, rused) = self.expand(&remote.path);
            let (host, hused) = self.expand(&remote.host);
            self.vars_in_path.extend(rused);
            self.vars_as_host.extend(hused.iter().cloned());
            let peer = remote.peer.clone().unwrap_or_default();
            let shown_peer = if hused.is_empty() {
                peer.clone()
            } else {
                format!("{peer} ({host})")
            };
            if !self.peers.contains(&shown_peer) {
                self.peers.push(shown_peer);
            }
            let mut rpath_abs = rpath.clone();
            if !rpath.starts_with('/') {
                let home = match remote.user.as_deref() {
                    None | Some("root") => "/root".to_string(),
                    Some(u) => format!("/home/{u}"),
                };
                let rel = rpath
                    .strip_prefix('~')
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(&rpath);
                rpath_abs = format!("{home}/{rel}");
                comments.push(format!(
                    "line {no}: remote path {:?} is relative to the login's home directory, taken to be {home}",
                    remote.path
                ));
            }
            let r_slash =
                remote.path.is_empty() || remote.path.ends_with('/') || remote.path.ends_with("/.");
            let (lpath, _) = self.expand(&local.path);
            let mut lpath = clean_path(&lpath);
            if !lpath.starts_with('/') {
                if let Some(cwd) = &self.cwd {
                    lpath = clean_path(&format!("{cwd}/{lpath}"));
                }
            }
            let l_slash = local.path.ends_with('/');
            let mut path = clean_path(&rpath_abs);
            // The side that is read decides whether the directory itself or its contents travel.
            let (directory, source_has_slash) = match direction {
                Direction::Pull => {
                    if l_slash && !r_slash && basename(&path) != basename(&lpath) {
                        lpath = clean_path(&format!("{lpath}/{}", basename(&path)));
                    }
                    (r_slash, r_slash)
                }
                Direction::Push => {
                    if r_slash && !l_slash && !basename(&lpath).is_empty() {
                        let b = basename(&lpath).to_string();
                        path = clean_path(&format!("{path}/{b}"));
                        copy_comments.push(format!(
                            "line {no}: {} has no trailing slash, so rsync put it inside {}: the set is {path}",
                            local.path, remote.path
                        ));
                    }
                    (l_slash, l_slash)
                }
            };
            let parent_of = (!source_has_slash).then(|| basename(&path).to_string());
            let mut excludes = Vec::new();
            for pat in &args.excludes {
                let (new, why) = translate_exclude(pat, parent_of.as_deref());
                copy_comments.extend(why);
                excludes.push(new);
            }
            let mode = mode_of(&path);
            for d in &args.deletes {
                copy_comments.push(match mode {
                    SetMode::Mirror => format!("{d}: mirror mode deletes anyway"),
                    SetMode::Append => format!("{d}: dropped; append mode only adds to log files"),
                });
            }
            let mut set_guards = Vec::new();
            let mut lock_checks = Vec::new();
            for g in &guards {
                let tested = format!("{}/{}", g.dir.trim_end_matches('/'), g.pattern);
                lock_checks.push((tested.clone(), g.line));
                let rel = relative_under(&g.dir, &path).or_else(|| relative_under(&g.dir, &lpath));
                match rel {
                    Some(rel) => {
                        let pat = if rel.is_empty() { g.pattern.clone() } else { format!("{rel}/{}", g.pattern) };
                        set_guards.push((pat, tested, g.line));
                    }
                    None => copy_comments.push(format!(
                        "the lock check on line {} tests {tested}, which is outside this set: not translated",
                        g.line
                    )),
                }
            }
            let set = match self.sets.iter_mut().position(|s| s.path == path) {
                Some(i) => &mut self.sets[i],
                None => {
                    self.sets.push(SetAcc {
                        path: path.clone(),
                        uses: Vec::new(),
                        guards: Vec::new(),
                        lock_checks: Vec::new(),
                        comments: Vec::new(),
                    });
                    self.sets.last_mut().expect("just pushed")
                }
            };
            set.uses.push(Use {
                line: no,
                direction,
                peer,
                local: lpath,
                directory,
                excludes,
                delete: !args.deletes.is_empty(),
                hard_links: args.hard_links,
                xattrs: args.xattrs,
            });
            set.guards.extend(set_guards);
            set.lock_checks.extend(lock_checks);
            let line_comments = comments
                .into_iter()
                .map(|text| (text, false))
                .chain(copy_comments.into_iter().map(|text| (text, true)));
            set.comments
                .extend(line_comments.map(|(text, file_copy)| LineComment { text, file_copy }));
        }
    }

    pub(super) fn finish(mut self) -> Translation {
        while let Some(frame) = self.stack.last() {
            match frame {
                Frame::If { .. } => self.close_if(),
                Frame::Loop => {
                    self.stack.pop();
                }
            }
        }
        let role_file = self.promote_file.clone();
        let (sets, account_notes) = draft_all(std::mem::take(&mut self.sets));
        let mut notes: Vec<String> = Vec::new();
        if self.rsync_lines == 0 {
            notes.push("no rsync invocation found: there is no [[sync]] set to draft".to_string());
        } else if sets.is_empty() {
            notes.push(
                "no rsync line could be translated into a [[sync]] set (see below)".to_string(),
            );
        }
        for n in std::mem::take(&mut self.notes) {
            notes.push(match n {
                Pending::Done(s) => s,
                Pending::Leader(text) => match &role_file {
                    Some(f) => format!(
                        "not translated: {text} (clusterd elects the leader; role_file = {} in [hooks] keeps a PROMOTE file for old scripts)",
                        toml_string(f)
                    ),
                    None => format!(
                        "not translated: {text} (clusterd elects the leader; on_promote/on_demote in [hooks] run a command when the role changes)"
                    ),
                },
                Pending::Assignment { text, name } => {
                    let why = if self.vars_as_host.contains(&name) {
                        "shell variable naming the peer: list every node as a [[peer]] with its addr instead"
                    } else if self.vars_in_path.contains(&name) {
                        "shell variable; expanded in the paths of the sets"
                    } else {
                        "shell variable"
                    };
                    format!("not translated: {text} ({why})")
                }
            });
        }
        if let Some(f) = &role_file {
            notes.push(format!(
                "suggested [hooks] role_file = {} (clusterd writes \"1\" there on the leader and \"0\" elsewhere, for scripts that still read it)",
                toml_string(f)
            ));
        }
        if !self.peers.is_empty() {
            notes.push(format!(
                "peers: the script synced with {}; list every node as a [[peer]] (clusterd talks mutual TLS between nodes, no root ssh)",
                self.peers.join(", ")
            ));
        }
        notes.extend(account_notes);
        Translation { sets, notes }
    }
}

/// The account databases an accounts set covers, in the order its comments name them.
pub(super) const ACCOUNT_DATABASES: [&str; 4] = ["passwd", "shadow", "group", "gshadow"];

/// `.../shadow-` → `("shadow", true)`: the account database a file name belongs to, and
/// whether it is the `-` backup shadow-utils keeps of it.
pub(super) fn account_file(path: &str) -> Option<(&'static str, bool)> {
    let name = basename(path);
    let (db, backup) = match name.strip_suffix('-') {
        Some(db) => (db, true),
        None => (name, false),
    };
    ACCOUNT_DATABASES
        .iter()
        .find(|d| **d == db)
        .map(|d| (*d, backup))
}

/// The directory holding `path` (`/` for `/x`).
pub(super) fn parent_dir(path: &str) -> String {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) => "/".to_string(),
        Some((dir, _)) => dir.to_string(),
        None => ".".to_string(),
    }
}

/// The account database (and backup flag) of a set that copied one whole, if it is one.
fn account_set(acc: &SetAcc) -> Option<(&'static str, bool)> {
    if acc.uses.iter().any(|u| u.directory) {
        return None;
    }
    account_file(&acc.path)
}

/// The sets in the order of their first rsync line, with the account databases of a
/// directory folded into one accounts set; returns the notes about them too.
pub(super) fn draft_all(accs: Vec<SetAcc>) -> (Vec<SyncSetDraft>, Vec<String>) {
    // A directory's account files are folded when it is an `etc` directory or when the
    // script copied at least two of the four databases there: a lone `passwd` elsewhere
    // (/etc/exim4/passwd, /etc/nginx/passwd) is an application's password file.
    let mut databases: HashMap<String, BTreeSet<&'static str>> = HashMap::new();
    for acc in &accs {
        if let Some((db, _)) = account_set(acc) {
            databases
                .entry(parent_dir(&acc.path))
                .or_default()
                .insert(db);
        }
    }
    let folded =
        |dir: &str| basename(dir) == "etc" || databases.get(dir).is_some_and(|d| d.len() >= 2);

    enum Slot {
        Set(SetAcc),
        Accounts(usize),
    }
    let mut slots = Vec::new();
    let mut groups: Vec<(String, Vec<SetAcc>)> = Vec::new();
    for mut acc in accs {
        if account_set(&acc).is_none() {
            slots.push(Slot::Set(acc));
            continue;
        }
        let dir = parent_dir(&acc.path);
        if !folded(&dir) {
            acc.comments.push(LineComment {
                text: format!(
                    "named like an account database file ({}), but the script copies no other account file of {dir}: kept as a single file; if it holds system accounts, make it a kind = \"accounts\" set of {dir} instead",
                    basename(&acc.path)
                ),
                file_copy: false,
            });
            slots.push(Slot::Set(acc));
            continue;
        }
        match groups.iter().position(|(d, _)| *d == dir) {
            Some(i) => groups[i].1.push(acc),
            None => {
                slots.push(Slot::Accounts(groups.len()));
                groups.push((dir, vec![acc]));
            }
        }
    }

    let mut taken = HashSet::new();
    let mut sets = Vec::new();
    let mut notes = Vec::new();
    let mut groups: Vec<Option<(String, Vec<SetAcc>)>> = groups.into_iter().map(Some).collect();
    for slot in slots {
        match slot {
            Slot::Set(acc) => sets.push(draft(acc, &mut taken)),
            Slot::Accounts(i) => {
                let Some((dir, members)) = groups.get_mut(i).and_then(Option::take) else {
                    continue;
                };
                let (set, note) = accounts_draft(dir, members, &mut taken);
                sets.extend(set);
                notes.push(note);
            }
        }
    }
    (sets, notes)
}

/// `lines 40, 41 (pull from root@h), line 73 (push to root@h)`: the lines of `uses`, by
/// direction and peer in the order of their first line.
fn origins(uses: &[&Use]) -> String {
    let mut groups: Vec<(Direction, &str, Vec<usize>)> = Vec::new();
    for u in uses {
        match groups
            .iter_mut()
            .find(|(d, p, _)| *d == u.direction && *p == u.peer)
        {
            Some((_, _, lines)) => lines.push(u.line),
            None => groups.push((u.direction, &u.peer, vec![u.line])),
        }
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|(direction, peer, lines)| match direction {
            Direction::Pull => format!("{} (pull from {peer})", line_list(lines)),
            Direction::Push => format!("{} (push to {peer})", line_list(lines)),
        })
        .collect();
    parts.join(", ")
}

/// Joins line numbers: `40, 73`.
fn line_list(lines: impl IntoIterator<Item = usize>) -> String {
    let mut lines: Vec<usize> = lines.into_iter().collect();
    lines.sort_unstable();
    lines.dedup();
    let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
    format!(
        "{} {}",
        if lines.len() == 1 { "line" } else { "lines" },
        lines.join(", ")
    )
}

/// One accounts set for the whole-file copies of `dir`'s account databases (`members`,
/// in the order of their first line), and the note saying so; only the note when the
/// script copied nothing but `-` backups there.
pub(super) fn accounts_draft(
    dir: String,
    members: Vec<SetAcc>,
    taken: &mut HashSet<String>,
) -> (Option<SyncSetDraft>, String) {
    let paths: Vec<String> = members.iter().map(|m| m.path.clone()).collect();
    let backups: Vec<String> = paths
        .iter()
        .filter(|p| account_file(p).is_some_and(|(_, b)| b))
        .cloned()
        .collect();
    let lines = line_list(members.iter().flat_map(|m| m.uses.iter().map(|u| u.line)));
    if backups.len() == paths.len() {
        return (
            None,
            format!(
                "not translated: the copies of {} ({}): \"-\" backups of the account databases, which every node keeps for itself (written as shadow-utils does); to replicate the accounts themselves, add a kind = \"accounts\" set with path = {}",
                paths.join(", "),
                lines,
                toml_string(&dir)
            ),
        );
    }

    let base = if dir == "/etc" {
        "accounts".to_string()
    } else {
        format!("accounts-{}", set_name(&dir))
    };
    let name = unique_name(base.clone(), taken);
    let mut uses: Vec<&Use> = members.iter().flat_map(|m| &m.uses).collect();
    uses.sort_by_key(|u| u.line);
    let mut comments = origin_comments(
        format!("{dir}: the account databases, from {}", origins(&uses)),
        uses.iter().copied(),
        &name,
        &base,
    );
    comments.push(format!(
        "kind accounts: the script copied {} whole; one accounts set of {dir} takes the place of {}",
        paths.join(", "),
        if paths.len() == 1 {
            "that single-file set"
        } else {
            "a single-file set per file"
        }
    ));
    comments.push(
        "clusterd replicates accounts as records, not as files: the users and groups whose uid or gid lies in uid_range or gid_range, and those named in include, go from the leader to the followers, with their shadow entries and group memberships".to_string(),
    );
    comments.push(
        "each node keeps its own system accounts (root, daemons, service users): their ids differ from host to host, so they are not replicated, and each follower merges the replicated records into its own files".to_string(),
    );
    comments.push(
        "copying the files whole, as the old script did, replaced the other nodes' system accounts with the leader's, which breaks every service whose user or group has another id (or does not exist) there".to_string(),
    );
    if !backups.is_empty() {
        comments.push(format!(
            "the \"-\" backups {} are not replicated: every node keeps its own, written as shadow-utils does",
            backups.join(", ")
        ));
    }
    let copied: BTreeSet<&str> = paths
        .iter()
        .filter_map(|p| account_file(p).map(|(db, _)| db))
        .collect();
    let missing: Vec<String> = ACCOUNT_DATABASES
        .iter()
        .filter(|db| !copied.contains(*db))
        .map(|db| format!("{}/{db}", dir.trim_end_matches('/')))
        .collect();
    if !missing.is_empty() {
        comments.push(format!(
            "the script did not copy {}; an accounts set covers all four files, so the replicated users' and groups' entries there travel too",
            missing.join(", ")
        ));
    }
    let mut staged: Vec<&str> = Vec::new();
    for m in &members {
        for u in &m.uses {
            if u.local != m.path && !staged.contains(&u.local.as_str()) {
                staged.push(&u.local);
            }
        }
    }
    if !staged.is_empty() {
        comments.push(format!(
            "the script staged them in {} on the machine running it; clusterd syncs the accounts of {dir} itself on every node",
            staged.join(", ")
        ));
    }

    // What made sense for copying the files whole does not apply to records.
    let mut excluded: Vec<&String> = Vec::new();
    for u in &uses {
        for e in &u.excludes {
            if !excluded.contains(&e) {
                excluded.push(e);
            }
        }
    }
    if !excluded.is_empty() {
        let lines = uses
            .iter()
            .filter(|u| !u.excludes.is_empty())
            .map(|u| u.line);
        comments.push(format!(
            "exclude {} ({}) dropped: an accounts set has no exclude; include and the ranges choose the accounts",
            excluded
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            line_list(lines)
        ));
    }
    if uses.iter().any(|u| u.delete) {
        comments.push(format!(
            "--delete ({}) dropped: accounts removed on the leader are removed on the followers anyway; a change removing more than max_removed at once waits for `clusterctl sync {name} --confirm`",
            line_list(uses.iter().filter(|u| u.delete).map(|u| u.line))
        ));
    }
    if uses.iter().any(|u| u.hard_links || u.xattrs) {
        comments.push(format!(
            "-H, -A and -X ({}) dropped: each node's account files keep their own mode, owner and attributes",
            line_list(
                uses.iter()
                    .filter(|u| u.hard_links || u.xattrs)
                    .map(|u| u.line)
            )
        ));
    }
    let mut checks: Vec<(&String, Vec<usize>)> = Vec::new();
    for m in &members {
        for (tested, line) in &m.lock_checks {
            match checks.iter_mut().find(|(t, _)| *t == tested) {
                Some((_, lines)) => lines.push(*line),
                None => checks.push((tested, vec![*line])),
            }
        }
    }
    for (tested, lines) in checks {
        comments.push(format!(
            "the script skipped the copy while {tested} existed (lock check on {}): dropped, clusterd reads the account files only while no shadow-utils lock is held and writes them under that lock",
            line_list(lines)
        ));
    }
    for m in members {
        for c in m.comments {
            if !c.file_copy && !comments.contains(&c.text) {
                comments.push(c.text);
            }
        }
    }

    let note = format!(
        "the whole-file copies of {} ({}) became one accounts set {name:?} with path = {}: clusterd replicates accounts as records (users and groups in uid_range/gid_range or named in include) and each node keeps its own system accounts, whose ids differ between hosts, while copying the files whole overwrote those on the other nodes{}",
        paths.join(", "),
        lines,
        toml_string(&dir),
        if backups.is_empty() {
            ""
        } else {
            "; the \"-\" backups are not replicated, every node keeps its own"
        }
    );
    let set = SyncSetDraft {
        name,
        path: dir,
        kind: PathKind::Accounts,
        mode: SetMode::Mirror,
        exclude: Vec::new(),
        skip_while: Vec::new(),
        hard_links: false,
        xattrs: false,
        comments,
    };
    (Some(set), note)
}

pub(super) fn mode_of(path: &str) -> SetMode {
    if relative_under(path, "/var/log").is_some() {
        SetMode::Append
    } else {
        SetMode::Mirror
    }
}

/// `/etc/tacacs+` → `etc-tacacs+`; see the module documentation.
pub(super) fn set_name(path: &str) -> String {
    let s: String = path
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "._+-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches('-');
    if s.is_empty() {
        "fs-root".to_string()
    } else {
        s.to_string()
    }
}

pub(super) fn unique_name(base: String, taken: &mut HashSet<String>) -> String {
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// A draft's first comments: where it came from (`head`, plus a word when
/// the script both pulled and pushed it), and the name it got when its own
/// (`base`) was taken.
fn origin_comments<'a>(
    head: String,
    uses: impl Iterator<Item = &'a Use> + Clone,
    name: &str,
    base: &str,
) -> Vec<String> {
    let both = uses.clone().any(|u| u.direction == Direction::Pull)
        && uses.clone().any(|u| u.direction == Direction::Push);
    let mut comments = vec![format!(
        "{head}{}",
        if both {
            "; one set, clusterd picks the direction from the leader"
        } else {
            ""
        }
    )];
    if name != base {
        comments.push(format!(
            "name {name:?}: {base:?} was already taken by another set"
        ));
    }
    comments
}

pub(super) fn draft(acc: SetAcc, taken: &mut HashSet<String>) -> SyncSetDraft {
    let path = acc.path;
    let base = set_name(&path);
    let name = unique_name(base.clone(), taken);
    let kind = if acc.uses.iter().any(|u| u.directory) || looks_like_dir(&path) {
        PathKind::Directory
    } else {
        PathKind::File
    };
    let mode = mode_of(&path);
    let mut comments = Vec::new();

    let origin: Vec<String> = acc
        .uses
        .iter()
        .map(|u| match u.direction {
            Direction::Pull => format!("line {} (pull from {})", u.line, u.peer),
            Direction::Push => format!("line {} (push to {})", u.line, u.peer),
        })
        .collect();
    comments.extend(origin_comments(
        format!("{path}: from {}", origin.join(", ")),
        acc.uses.iter(),
        &name,
        &base,
    ));
    comments.push(match mode {
        SetMode::Append => {
            "mode append: a log directory (under /var/log); logs only grow, so only appended bytes travel".to_string()
        }
        SetMode::Mirror => {
            "mode mirror: followers keep an exact copy of the leader's files, deletions included".to_string()
        }
    });
    match kind {
        PathKind::File => comments.push("a single file: the script names it without a trailing slash".to_string()),
        PathKind::Directory if !acc.uses.iter().any(|u| u.directory) => comments.push(
            "a directory: the script names it without a trailing slash, but it is a well-known directory".to_string(),
        ),
        PathKind::Directory | PathKind::Accounts => {}
    }
    let mut staged: Vec<&str> = Vec::new();
    for u in &acc.uses {
        if u.local != path && !staged.contains(&u.local.as_str()) {
            staged.push(&u.local);
        }
    }
    if !staged.is_empty() {
        comments.push(format!(
            "the script staged it in {} on the machine running it; clusterd syncs {path} itself on every node",
            staged.join(", ")
        ));
    }

    let mut exclude: Vec<String> = Vec::new();
    for u in &acc.uses {
        for e in &u.excludes {
            if !exclude.contains(e) {
                exclude.push(e.clone());
            }
        }
    }
    let variants: BTreeSet<BTreeSet<&String>> = acc
        .uses
        .iter()
        .map(|u| u.excludes.iter().collect())
        .collect();
    if variants.len() > 1 {
        // (exclude list in the line's own order, lines), grouped by the set of patterns
        let mut groups: Vec<(&Vec<String>, Vec<String>)> = Vec::new();
        for (u, o) in acc.uses.iter().zip(&origin) {
            let key: BTreeSet<&String> = u.excludes.iter().collect();
            match groups
                .iter_mut()
                .find(|(k, _)| k.iter().collect::<BTreeSet<_>>() == key)
            {
                Some((_, lines)) => lines.push(o.clone()),
                None => groups.push((&u.excludes, vec![o.clone()])),
            }
        }
        let described: Vec<String> = groups
            .iter()
            .map(|(k, lines)| {
                let what = if k.is_empty() {
                    "nothing".to_string()
                } else {
                    k.iter()
                        .map(|e| format!("{e:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("{} excluded {what}", lines.join(", "))
            })
            .collect();
        comments.push(format!(
            "the lines disagreed on excludes: {}; all of them are kept so that nothing an old line excluded starts syncing",
            described.join("; ")
        ));
    }
    if kind == PathKind::Directory && mode == SetMode::Mirror && !acc.uses.iter().any(|u| u.delete)
    {
        comments.push(
            "no line passed --delete, so files deleted at the source stayed on the other nodes; in mirror mode they are deleted there too".to_string(),
        );
    }
    if kind == PathKind::File && !exclude.is_empty() {
        comments.push("exclude has no effect on a single file".to_string());
    }

    let mut skip_while: Vec<String> = Vec::new();
    let mut guard_desc: Vec<(String, String, Vec<usize>)> = Vec::new();
    for (pat, tested, line) in acc.guards {
        if !skip_while.contains(&pat) {
            skip_while.push(pat.clone());
        }
        match guard_desc
            .iter_mut()
            .find(|(p, t, _)| *p == pat && *t == tested)
        {
            Some((_, _, lines)) => {
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
            None => guard_desc.push((pat, tested, vec![line])),
        }
    }
    for (pat, tested, lines) in guard_desc {
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        comments.push(format!(
            "skip_while {pat:?}: the script skipped this set while {tested} existed (lock check on {} {})",
            if lines.len() == 1 { "line" } else { "lines" },
            lines.join(", ")
        ));
    }
    let lines_with = |f: fn(&Use) -> bool| -> Vec<String> {
        acc.uses
            .iter()
            .filter(|u| f(u))
            .map(|u| u.line.to_string())
            .collect()
    };
    let linked = lines_with(|u| u.hard_links);
    let hard_links = !linked.is_empty() && mode == SetMode::Mirror;
    if !linked.is_empty() && !hard_links {
        comments.push(format!(
            "-H on line {}: not kept, an append set cannot keep hard links",
            linked.join(", ")
        ));
    }
    let xattrs = !lines_with(|u| u.xattrs).is_empty();
    for c in acc.comments {
        if !comments.contains(&c.text) {
            comments.push(c.text);
        }
    }
    SyncSetDraft {
        name,
        path,
        kind,
        mode,
        exclude,
        skip_while,
        hard_links,
        xattrs,
        comments,
    }
}
