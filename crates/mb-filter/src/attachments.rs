//! The attachment rules: every MIME part's file names (whatever its type or disposition),
//! the declared type and size of attachments, the names inside archives (nested ones
//! included, see `archive`), and attached messages, judged against `attachments.*`.

use std::collections::HashSet;

use mail_parser::{Message, MessagePart, MimeHeaders};
use mb_core::Config;
use mb_core::verdict::Symbol;

use crate::archive;

/// What attachments may not be.
pub struct AttachmentRules {
    pub extensions: Vec<String>,
    pub types: Vec<String>,
    /// Decoded bytes; 0 for no limit.
    pub max_size: u64,
    /// How far archives are opened.
    pub archives: archive::Limits,
    /// What an archive with encrypted members leads to.
    pub encrypted_action: ArchiveAction,
    /// What an archive that cannot be looked into leads to.
    pub unscannable_action: ArchiveAction,
}

/// `attachments.encrypted_action` and `attachments.unscannable_action`: what follows from
/// an archive whose members cannot be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveAction {
    /// A symbol with a score; the thresholds decide.
    Score,
    /// The message is quarantined (unless something refuses it).
    Quarantine,
    /// The message is refused.
    Reject,
}

impl ArchiveAction {
    fn from_config(cfg: &Config, key: &str) -> ArchiveAction {
        match cfg.text(key).as_str() {
            "quarantine" => ArchiveAction::Quarantine,
            "reject" => ArchiveAction::Reject,
            _ => ArchiveAction::Score,
        }
    }
}

impl AttachmentRules {
    pub fn from_config(cfg: &Config) -> AttachmentRules {
        AttachmentRules {
            extensions: cfg.list("attachments.blocked_extensions"),
            types: cfg.list("attachments.blocked_types"),
            max_size: cfg.size("attachments.max_size"),
            archives: archive::Limits {
                depth: u32::try_from(cfg.int("attachments.archive_depth")).unwrap_or(1),
                max_size: cfg.size("attachments.archive_max_size"),
                max_ratio: u64::try_from(cfg.int("attachments.archive_max_ratio")).unwrap_or(1),
            },
            encrypted_action: ArchiveAction::from_config(cfg, "attachments.encrypted_action"),
            unscannable_action: ArchiveAction::from_config(cfg, "attachments.unscannable_action"),
        }
    }

    /// Whether a file name's last extension, once normalised, is blocked
    /// (`invoice.pdf.exe` is an `exe`, and so are `x.EXE. .` and `x\u{202e}fdp.exe`).
    fn name_blocked(&self, name: &FileName) -> bool {
        name.extension()
            .is_some_and(|ext| self.extensions.iter().any(|b| b.to_lowercase() == ext))
    }
}

/// What the attachment rules found.
#[derive(Debug, Default, PartialEq)]
pub struct AttachmentFindings {
    /// Why the message is refused: one line per offending attachment.
    pub blocked: Vec<String>,
    /// Archives with encrypted members (their contents cannot be checked), by path
    /// (`"files.zip"`, `"files.zip/inner.zip"`).
    pub encrypted: Vec<String>,
    /// Archives or members that could not be looked into, one sentence each.
    pub unscannable: Vec<String>,
    /// Attachments that expand beyond `attachments.archive_max_ratio`, one sentence each.
    pub bombs: Vec<String>,
    /// File names, as given, that hold bidi embedding, override or isolate controls.
    pub bidi_names: Vec<String>,
    /// File names, as given, that hold other invisible or control characters.
    pub hidden_char_names: Vec<String>,
}

/// What the findings lead to under the rules' actions.
#[derive(Debug, Default, PartialEq)]
pub struct Judgement {
    /// The message is refused: the reply's text and the symbol that says why.
    pub refusal: Option<(String, Symbol)>,
    /// The message is quarantined unless something else refuses it, and why.
    pub quarantine: Option<String>,
    /// The scoring symbols (and, with a score of 0, those an action decided).
    pub symbols: Vec<Symbol>,
}

/// What an encrypted archive or an unscannable one scores under `ArchiveAction::Score`:
/// its contents are unknown, which is suspicious but common in honest mail.
const UNKNOWN_CONTENT_SCORE: f64 = 2.0;
/// A decompression bomb has no honest use: above the default quarantine threshold.
const BOMB_SCORE: f64 = 10.0;

impl AttachmentFindings {
    /// The refusal, quarantine and symbols these findings lead to under `rules`. A blocked
    /// attachment refuses the message first; then an archive action of `reject`, then one
    /// of `quarantine`. The symbol of an archive action that decided scores 0: the action,
    /// not the score, is its outcome.
    pub fn judge(&self, rules: &AttachmentRules) -> Judgement {
        let mut out = Judgement::default();
        if let Some(first) = self.blocked.first() {
            out.refusal = Some((
                format!("Message refused: {first}"),
                symbol("BLOCKED_ATTACHMENT", 0.0, self.blocked.join("; ")),
            ));
        }
        for (found, action, name, what) in [
            (
                &self.encrypted,
                rules.encrypted_action,
                "ENCRYPTED_ARCHIVE",
                "an archive with encrypted members",
            ),
            (
                &self.unscannable,
                rules.unscannable_action,
                "ARCHIVE_UNSCANNABLE",
                "an archive that cannot be looked into",
            ),
        ] {
            let Some(first) = found.first() else {
                continue;
            };
            // Encrypted archives are paths as given; unscannable ones are sentences whose
            // names `archive` already escaped.
            let (detail, reason) = if name == "ENCRYPTED_ARCHIVE" {
                (
                    listed(found),
                    format!("archive {first:?} has encrypted members"),
                )
            } else {
                (found.join("; "), first.clone())
            };
            match action {
                ArchiveAction::Score => {
                    out.symbols.push(symbol(
                        name,
                        UNKNOWN_CONTENT_SCORE,
                        format!("{what}: {detail}"),
                    ));
                }
                ArchiveAction::Quarantine => {
                    out.quarantine.get_or_insert(reason);
                    out.symbols.push(symbol(name, 0.0, detail));
                }
                ArchiveAction::Reject => {
                    if out.refusal.is_none() {
                        out.refusal = Some((
                            format!("Message refused: {reason}"),
                            symbol(name, 0.0, detail),
                        ));
                    } else {
                        out.symbols.push(symbol(name, 0.0, detail));
                    }
                }
            }
        }
        if !self.bombs.is_empty() {
            out.symbols
                .push(symbol("ARCHIVE_BOMB", BOMB_SCORE, self.bombs.join("; ")));
        }
        // A file name has no use for a right-to-left override or an isolate except to
        // show its extension somewhere else than where it is (`invoice<RLO>fdp.exe` reads
        // `invoiceexe.pdf`): it scores the default quarantine threshold on its own, and
        // quarantines the message whatever else it scores, as the sender's own SPF and
        // DKIM passes (worth -1.5, and free for any domain) would otherwise buy such a
        // message down to a tag.
        if let Some(first) = self.bidi_names.first() {
            out.quarantine.get_or_insert(format!(
                "attachment name {first:?} hides its extension with bidi control characters"
            ));
            out.symbols
                .push(symbol("FILENAME_BIDI", 6.0, listed(&self.bidi_names)));
        }
        if !self.hidden_char_names.is_empty() {
            out.symbols.push(symbol(
                "FILENAME_HIDDEN_CHARS",
                1.0,
                listed(&self.hidden_char_names),
            ));
        }
        out
    }

    /// Records a name that hides characters (as given, each once).
    fn note_disguise(&mut self, given: &str, name: &FileName) {
        if name.bidi && !self.bidi_names.iter().any(|n| n == given) {
            self.bidi_names.push(given.to_string());
        }
        if name.hidden && !self.hidden_char_names.iter().any(|n| n == given) {
            self.hidden_char_names.push(given.to_string());
        }
    }
}

/// Checks every part: its file names (Content-Disposition `filename` and Content-Type
/// `name`, either of which may be blocked), and for attachments their declared type and
/// size and what their archives hold; attached messages too (a few levels deep).
pub fn check_attachments(message: &Message<'_>, rules: &AttachmentRules) -> AttachmentFindings {
    let mut out = AttachmentFindings::default();
    collect_blocked(message, rules, &mut out, 0);
    out
}

fn collect_blocked(
    message: &Message<'_>,
    rules: &AttachmentRules,
    out: &mut AttachmentFindings,
    depth: u32,
) {
    let attachments: HashSet<usize> = message
        .attachments
        .iter()
        .filter_map(|&id| usize::try_from(id).ok())
        .collect();
    for (id, part) in message.parts.iter().enumerate() {
        let names = part_names(part);
        for given in &names {
            let name = FileName::new(given);
            out.note_disguise(given, &name);
            if rules.name_blocked(&name) {
                out.blocked
                    .push(format!("attachment {given:?} is of a blocked type"));
            }
        }
        if attachments.contains(&id) {
            let name = names.first().map_or("(unnamed)", String::as_str);
            check_content(part, name, rules, out);
        }
        // An attached message is scanned too (a few levels deep, no further).
        if depth < 4
            && let Some(inner) = part.message()
        {
            collect_blocked(inner, rules, out, depth + 1);
        }
    }
}

/// An attachment's declared type, size, and what it holds when it is an archive.
fn check_content(
    part: &MessagePart<'_>,
    name: &str,
    rules: &AttachmentRules,
    out: &mut AttachmentFindings,
) {
    if let Some(ct) = part.content_type() {
        let mime =
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()).to_ascii_lowercase();
        if rules.types.iter().any(|t| t.eq_ignore_ascii_case(&mime)) {
            out.blocked
                .push(format!("attachment {name:?} has the blocked type {mime}"));
        }
    }
    let data = part.contents();
    if rules.max_size > 0 && data.len() as u64 > rules.max_size {
        out.blocked.push(format!(
            "attachment {name:?} is larger than {} bytes",
            rules.max_size
        ));
    }
    let contents = archive::inspect(name, data, &rules.archives);
    for member in &contents.members {
        let inner = &member.name;
        let normal = FileName::new(inner);
        out.note_disguise(inner, &normal);
        if rules.name_blocked(&normal) {
            out.blocked.push(format!(
                "archive {:?} holds {inner:?}, a blocked type",
                member.archive
            ));
        }
    }
    out.encrypted.extend(contents.encrypted);
    out.unscannable.extend(contents.unscannable);
    out.bombs.extend(contents.bomb);
}

/// A part's file names, as mail-parser decoded them (RFC 2047 encoded words, RFC 2231
/// charsets, percent-encoding and continuations): every Content-Disposition `filename`
/// and Content-Type `name`, each once. Mail clients differ in which one they show and
/// save under, so each counts.
fn part_names(part: &MessagePart<'_>) -> Vec<String> {
    let disposition = part
        .content_disposition()
        .and_then(|cd| cd.attributes())
        .unwrap_or_default()
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("filename"));
    let content_type = part
        .content_type()
        .and_then(|ct| ct.attributes())
        .unwrap_or_default()
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case("name"));
    let mut out: Vec<String> = Vec::new();
    for a in disposition.chain(content_type) {
        if !a.value.is_empty() && !out.iter().any(|n| *n == a.value) {
            out.push(a.value.to_string());
        }
    }
    out
}

/// A file name as the recipient's system would save and open it: without invisible
/// format and control characters (which display as nothing), without the trailing dots
/// and spaces Windows drops, case-folded; and whether it had such characters.
#[derive(Debug, PartialEq, Eq)]
struct FileName {
    normal: String,
    /// It held bidi embedding, override or isolate controls (U+202A–U+202E,
    /// U+2066–U+2069).
    bidi: bool,
    /// It held other invisible or control characters (see `hidden`).
    hidden: bool,
}

impl FileName {
    fn new(given: &str) -> FileName {
        let mut bidi = false;
        let mut hidden = false;
        let kept: String = given
            .chars()
            .filter(|&c| {
                if matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                    bidi = true;
                    false
                } else if matches!(c, '\u{200c}' | '\u{200d}') {
                    // Zero-width (non-)joiners are ordinary in Persian and Indic names and
                    // in emoji: removed for the check, but no sign of a disguise.
                    false
                } else if invisible(c) {
                    hidden = true;
                    false
                } else {
                    true
                }
            })
            .collect();
        let normal = kept
            .trim()
            .trim_end_matches(|c: char| c == '.' || c.is_whitespace())
            .to_lowercase();
        FileName {
            normal,
            bidi,
            hidden,
        }
    }

    /// The last extension (`gz` for `a.tar.gz`); `None` without a dot.
    fn extension(&self) -> Option<&str> {
        self.normal.rsplit_once('.').map(|(_, ext)| ext)
    }
}

/// Characters that are invisible in a file name and that no system keeps in its
/// extension check: control characters, bidi marks, zero-width space, the byte order
/// mark, the soft hyphen and other format characters (Unicode category Cf). Tabs and
/// line breaks are not among them: a folded header line leaves them in honest names.
fn invisible(c: char) -> bool {
    (c.is_control() && !c.is_ascii_whitespace())
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2060}'..='\u{2064}'
                | '\u{206a}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

fn symbol(name: &str, score: f64, detail: String) -> Symbol {
    Symbol {
        name: name.into(),
        score,
        detail,
    }
}

/// Names for a symbol's detail, escaped so that they cannot reorder the log line.
fn listed(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use mail_parser::MessageParser;

    use super::*;

    /// A message whose second part has the given header lines (LF-separated).
    fn message(part_headers: &str) -> Vec<u8> {
        format!(
            "From: a@example.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n\
             --b1\r\n{}\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n",
            part_headers.replace('\n', "\r\n")
        )
        .into_bytes()
    }

    /// The file names mail-parser gives the second part of `message(part_headers)`.
    fn names(part_headers: &str) -> Vec<String> {
        let raw = message(part_headers);
        let m = MessageParser::default().parse(&raw).expect("parses");
        // Part 0 is the multipart, 1 the text, 2 the part under test.
        assert!(part_names(&m.parts[1]).is_empty());
        part_names(&m.parts[2])
    }

    #[test]
    fn every_encoding_of_a_file_name_is_decoded() {
        for (headers, want) in [
            // RFC 2231 charset and percent-encoding.
            (
                "Content-Type: application/octet-stream\n\
                 Content-Disposition: attachment; filename*=UTF-8''%E2%80%AEcod.exe",
                vec!["\u{202e}cod.exe"],
            ),
            // RFC 2231 continuations, quoted and not.
            (
                "Content-Type: application/octet-stream\n\
                 Content-Disposition: attachment; filename*0=\"invoice.e\"; filename*1=xe",
                vec!["invoice.exe"],
            ),
            // Encoded and continued; the charset is on the first section only.
            (
                "Content-Type: application/octet-stream\n\
                 Content-Disposition: attachment;\n filename*0*=UTF-8''r%C3%A9sum%C3%A9;\n filename*1=\".e\";\n filename*2=\"xe\"",
                vec!["résumé.exe"],
            ),
            // RFC 2047 encoded words, quoted (disposition) and unquoted (type).
            (
                "Content-Type: application/octet-stream; name==?UTF-8?B?w5xiZXJ3ZWlzdW5nLmV4ZQ==?=\n\
                 Content-Disposition: attachment; filename=\"=?ISO-8859-1?Q?r=E9sum=E9.pdf?=\"",
                vec!["résumé.pdf", "Überweisung.exe"],
            ),
            // Disposition and type disagree: both count, the disposition first.
            (
                "Content-Type: application/pdf; name=\"report.exe\"\n\
                 Content-Disposition: attachment; filename=\"report.pdf\"",
                vec!["report.pdf", "report.exe"],
            ),
            // The same name twice counts once; parameter names are case-insensitive.
            (
                "Content-Type: application/pdf; NAME=\"report.pdf\"\n\
                 Content-Disposition: attachment; FileName=\"report.pdf\"",
                vec!["report.pdf"],
            ),
            // A name on an inline text part.
            (
                "Content-Type: text/plain; charset=us-ascii\n\
                 Content-Disposition: inline; filename=\"x.exe\"",
                vec!["x.exe"],
            ),
        ] {
            assert_eq!(names(headers), want, "{headers}");
        }
    }

    #[test]
    fn names_are_normalised_before_their_extension_is_read() {
        // (given, extension, bidi, hidden)
        for (given, ext, bidi, hidden) in [
            ("report.final.pdf", Some("pdf"), false, false),
            ("résumé.pdf", Some("pdf"), false, false),
            ("x.EXE", Some("exe"), false, false),
            ("x.exe. . ", Some("exe"), false, false),
            ("script.js.", Some("js"), false, false),
            (" x.exe\t", Some("exe"), false, false),
            ("invoice\u{202e}fdp.exe", Some("exe"), true, false),
            ("photo\u{2067}gpj.scr\u{2069}", Some("scr"), true, false),
            ("x.e\u{200b}xe", Some("exe"), false, true),
            ("x.exe\u{feff}", Some("exe"), false, true),
            ("x.ex\u{0}e", Some("exe"), false, true),
            ("x.\u{200f}exe", Some("exe"), false, true),
            (
                "\u{0645}\u{06cc}\u{200c}\u{062e}.pdf",
                Some("pdf"),
                false,
                false,
            ),
            ("README", None, false, false),
            ("...", None, false, false),
        ] {
            let name = FileName::new(given);
            assert_eq!(
                (name.extension(), name.bidi, name.hidden),
                (ext, bidi, hidden),
                "{given:?} normalised to {:?}",
                name.normal
            );
        }
    }

    fn rules() -> AttachmentRules {
        AttachmentRules {
            extensions: vec!["exe".into(), "js".into(), "SCR".into()],
            types: vec!["application/x-msdownload".into()],
            max_size: 0,
            archives: archive::Limits {
                depth: 3,
                max_size: 100 << 20,
                max_ratio: 100,
            },
            encrypted_action: ArchiveAction::Score,
            unscannable_action: ArchiveAction::Score,
        }
    }

    fn check(part_headers: &str) -> AttachmentFindings {
        let raw = message(part_headers);
        let m = MessageParser::default().parse(&raw).expect("parses");
        check_attachments(&m, &rules())
    }

    #[test]
    fn any_name_of_any_part_can_block() {
        for (headers, blocked) in [
            (
                "Content-Type: text/plain\nContent-Disposition: inline; filename=\"x.exe\"",
                vec![r#"attachment "x.exe" is of a blocked type"#],
            ),
            (
                "Content-Type: application/pdf; name=\"report.exe\"\n\
                 Content-Disposition: attachment; filename=\"report.pdf\"",
                vec![r#"attachment "report.exe" is of a blocked type"#],
            ),
            (
                "Content-Type: application/octet-stream\n\
                 Content-Disposition: attachment; filename*=UTF-8''invoice%E2%80%AEfdp.exe",
                vec![r#"attachment "invoice\u{202e}fdp.exe" is of a blocked type"#],
            ),
            (
                "Content-Type: application/octet-stream; name=\"x.exe. . \"",
                vec![r#"attachment "x.exe. . " is of a blocked type"#],
            ),
            (
                "Content-Type: application/octet-stream; name=\"pic.Scr\"",
                vec![r#"attachment "pic.Scr" is of a blocked type"#],
            ),
            (
                "Content-Type: application/pdf; name=\"report.final.pdf\"",
                vec![],
            ),
            (
                "Content-Type: application/x-msdownload; name=\"setup.txt\"",
                vec![r#"attachment "setup.txt" has the blocked type application/x-msdownload"#],
            ),
        ] {
            assert_eq!(check(headers).blocked, blocked, "{headers}");
        }
    }

    #[test]
    fn the_name_of_a_single_part_message_counts() {
        let raw = b"From: a@example.test\r\nMIME-Version: 1.0\r\n\
                    Content-Type: application/octet-stream; name=\"x.exe\"\r\n\
                    Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n";
        let m = MessageParser::default().parse(raw).expect("parses");
        assert_eq!(
            check_attachments(&m, &rules()).blocked,
            vec![r#"attachment "x.exe" is of a blocked type"#]
        );
    }

    #[test]
    fn a_bidi_control_in_a_name_quarantines_whatever_the_score() {
        let found = check(
            "Content-Type: text/plain\n\
             Content-Disposition: attachment; filename*=UTF-8''report%E2%80%AEfdp.txt",
        );
        assert!(found.blocked.is_empty(), "{:?}", found.blocked);
        let judged = found.judge(&rules());
        assert!(
            judged
                .quarantine
                .as_deref()
                .is_some_and(|q| q.contains("bidi control characters")),
            "{:?}",
            judged.quarantine
        );
        assert_eq!(judged.symbols[0].name, "FILENAME_BIDI");
        // A harmless name quarantines nothing.
        assert!(
            check("Content-Type: text/plain; name=\"report.txt\"")
                .judge(&rules())
                .quarantine
                .is_none()
        );
    }

    #[test]
    fn invisible_characters_in_a_name_score_less_than_bidi_controls() {
        let found = check(
            "Content-Type: application/octet-stream\n\
             Content-Disposition: attachment; filename*=UTF-8''x.e%E2%80%8Bxe",
        );
        assert_eq!(
            found.blocked,
            vec![r#"attachment "x.e\u{200b}xe" is of a blocked type"#]
        );
        let symbols: Vec<(String, f64)> = found
            .judge(&rules())
            .symbols
            .into_iter()
            .map(|s| (s.name, s.score))
            .collect();
        assert_eq!(symbols, vec![("FILENAME_HIDDEN_CHARS".to_string(), 1.0)]);
    }

    #[test]
    fn disguised_names_score_even_when_allowed() {
        let found = check(
            "Content-Type: application/pdf\n\
             Content-Disposition: attachment; filename*=UTF-8''photo%E2%80%AEgnp.pdf",
        );
        assert!(found.blocked.is_empty());
        let symbols: Vec<(String, f64)> = found
            .judge(&rules())
            .symbols
            .into_iter()
            .map(|s| (s.name, s.score))
            .collect();
        assert_eq!(symbols, vec![("FILENAME_BIDI".to_string(), 6.0)]);
        let plain = check("Content-Type: application/pdf; name=\"r\u{e9}sum\u{e9}.pdf\"");
        assert_eq!(plain, AttachmentFindings::default());
    }

    #[test]
    fn archive_actions_decide_or_score() {
        let found = AttachmentFindings {
            encrypted: vec!["s.zip".into()],
            unscannable: vec![r#"archive "x.rar" is a RAR, which cannot be looked into"#.into()],
            ..AttachmentFindings::default()
        };
        let judged = |encrypted_action, unscannable_action| {
            let j = found.judge(&AttachmentRules {
                encrypted_action,
                unscannable_action,
                ..rules()
            });
            let symbols: Vec<(String, f64)> =
                j.symbols.into_iter().map(|s| (s.name, s.score)).collect();
            (
                j.refusal.map(|(text, s)| (text, s.name)),
                j.quarantine,
                symbols,
            )
        };
        use ArchiveAction::{Quarantine, Reject, Score};
        assert_eq!(
            judged(Score, Score),
            (
                None,
                None,
                vec![
                    ("ENCRYPTED_ARCHIVE".into(), 2.0),
                    ("ARCHIVE_UNSCANNABLE".into(), 2.0)
                ]
            )
        );
        assert_eq!(
            judged(Quarantine, Score),
            (
                None,
                Some(r#"archive "s.zip" has encrypted members"#.into()),
                vec![
                    ("ENCRYPTED_ARCHIVE".into(), 0.0),
                    ("ARCHIVE_UNSCANNABLE".into(), 2.0)
                ]
            )
        );
        assert_eq!(
            judged(Score, Reject),
            (
                Some((
                    r#"Message refused: archive "x.rar" is a RAR, which cannot be looked into"#
                        .into(),
                    "ARCHIVE_UNSCANNABLE".into()
                )),
                None,
                vec![("ENCRYPTED_ARCHIVE".into(), 2.0)]
            )
        );
        // A blocked attachment refuses first; a rejecting archive action still shows.
        let blocked = AttachmentFindings {
            blocked: vec!["attachment \"x.exe\" is of a blocked type".into()],
            ..found
        };
        let j = blocked.judge(&AttachmentRules {
            encrypted_action: Reject,
            ..rules()
        });
        assert_eq!(
            j.refusal.map(|(_, s)| s.name),
            Some("BLOCKED_ATTACHMENT".into())
        );
        assert!(
            j.symbols
                .iter()
                .any(|s| s.name == "ENCRYPTED_ARCHIVE" && s.score == 0.0)
        );
    }
}
