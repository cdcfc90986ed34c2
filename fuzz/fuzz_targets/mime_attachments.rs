//! MIME parsing and the attachment inspection the filter runs on every message (file
//! names in all their encodings, declared types, sizes, archives inside), with no I/O.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mb_filter::attachments::{AttachmentRules, check_attachments};

static RULES: LazyLock<AttachmentRules> =
    LazyLock::new(|| AttachmentRules::from_config(&mb_core::Config::default()));

fuzz_target!(|input: &[u8]| {
    if let Some(message) = mail_parser::MessageParser::default().parse(input) {
        let findings = check_attachments(&message, &RULES);
        let _ = findings.judge(&RULES);
    }
});
