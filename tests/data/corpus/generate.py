#!/usr/bin/python3
"""Writes the adversarial corpus: one NAME.eml (the message, CRLF, as sent) and one
NAME.case (what the case proves, the DNS records it needs, its envelope, policies and
expected verdict) per case. See README.md.

Run it with Debian's python3 (it needs dkimpy: `apt-get install python3-dkim`):

    /usr/bin/python3 tests/data/corpus/generate.py

The checked-in files are the corpus; this script is how they were made, kept so a case
can be changed and regenerated. Its output is deterministic (fixed DKIM and ARC
timestamps, fixed "random" data, no expiry tags), so regenerating changes only what the
script changed. DKIM signatures are real: the keys are test keys under keys/, and their
public halves are the cases' DNS records.
"""

import base64
import io
import os
import subprocess
import sys
import tarfile
import zipfile

import dkim

# dkimpy stamps t= with the clock: a fixed one keeps regenerated signatures identical
# (RSA PKCS#1 v1.5 signatures are deterministic).
dkim.time.time = lambda: SIGNED_AT

HERE = os.path.dirname(os.path.abspath(__file__))
DATE = "Sun, 22 Nov 2026 01:00:00 +0000"
# Fixed, so regenerating gives the same signatures (there is no x= expiry either).
SIGNED_AT = 1795827600
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def key(name):
    with open(os.path.join(HERE, "keys", name + ".key"), "rb") as f:
        return f.read()


def public(name):
    der = subprocess.run(
        ["openssl", "rsa", "-in", os.path.join(HERE, "keys", name + ".key"), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return base64.b64encode(der).decode()


S1 = public("s1")
BIG = public("big")


def spf(domain, allowed):
    return f"--txt-record={domain},v=spf1 ip4:{allowed} -all"


def dkim_record(domain, selector="s1", p=S1):
    value = f"v=DKIM1; k=rsa; p={p}"
    if len(value) > 255:
        # A TXT string holds at most 255 bytes: real zones split long keys, and the
        # verifier must join the strings again. dnsmasq makes one string of each
        # comma-separated part (quotes on its command line would be part of the data).
        return f"--txt-record={selector}._domainkey.{domain},{value[:200]},{value[200:]}"
    return f"--txt-record={selector}._domainkey.{domain},{value}"


def dmarc(domain, policy):
    return f"--txt-record=_dmarc.{domain},v=DMARC1; p={policy}"


BASE = [
    "--auth-server=ns.test,127.0.0.1",
    # Authoritative for test.: names with no data get NXDOMAIN, as in a real zone (a
    # domain without a DMARC record must look like one), not REFUSED.
    "--auth-zone=test",
    "--ptr-record=1.0.0.127.in-addr.arpa,mail.sender.test",
    "--host-record=mail.sender.test,127.0.0.1",
]

# Every domain of the corpus and its records. The client is always 127.0.0.1 (the
# standalone mode cannot pretend otherwise), so "SPF pass" means 127.0.0.1 is allowed.
ZONE = {
    "nodmarc.test": [spf("nodmarc.test", "127.0.0.1"), dkim_record("nodmarc.test")],
    "spfonly.test": [spf("spfonly.test", "127.0.0.1")],
    "honest.test": [spf("honest.test", "127.0.0.1"), dkim_record("honest.test"), dmarc("honest.test", "reject")],
    "key2048.test": [
        spf("key2048.test", "127.0.0.1"),
        dkim_record("key2048.test", "big", BIG),
        dmarc("key2048.test", "reject"),
    ],
    "author.test": [spf("author.test", "192.0.2.10"), dkim_record("author.test"), dmarc("author.test", "none")],
    "list.test": [spf("list.test", "127.0.0.1"), dkim_record("list.test"), dmarc("list.test", "reject")],
    "origin.test": [spf("origin.test", "192.0.2.20"), dkim_record("origin.test"), dmarc("origin.test", "reject")],
    "fwd.test": [spf("fwd.test", "127.0.0.1"), dkim_record("fwd.test")],
    "arcauthor.test": [spf("arcauthor.test", "192.0.2.30"), dkim_record("arcauthor.test"), dmarc("arcauthor.test", "none")],
    "quar.test": [spf("quar.test", "192.0.2.40"), dmarc("quar.test", "quarantine")],
    "strict.test": [spf("strict.test", "192.0.2.50"), dmarc("strict.test", "reject")],
    "attacker.test": [spf("attacker.test", "127.0.0.1"), dkim_record("attacker.test")],
    "partner.test": [spf("partner.test", "127.0.0.1"), dkim_record("partner.test")],
    "farpartner.test": [spf("farpartner.test", "192.0.2.60")],
}

POLICIES = {
    "allow-partner": {"object": "address", "pattern": "*@partner.test", "direction": "from", "action": "allow"},
    "allow-farpartner": {"object": "address", "pattern": "*@farpartner.test", "direction": "from", "action": "allow"},
    "allow-vip": {"object": "address", "pattern": "vip@served.test", "direction": "to", "action": "allow"},
}


def crlf(text):
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def message(headers, body):
    """headers: list of "Name: value" strings (folded lines allowed); body: str or bytes."""
    head = crlf("\n".join(headers) + "\n\n")
    if isinstance(body, str):
        body = crlf(body)
    return head + body


def std(frm, subject, mid, to="Bob <bob@served.test>", date=True, extra=()):
    h = [f"From: {frm}", f"To: {to}", f"Subject: {subject}"]
    if date:
        h.append(f"Date: {DATE}")
    if mid:
        h.append(f"Message-ID: <{mid}>")
    h.extend(extra)
    return h


def b64(data, width=76):
    s = base64.b64encode(data).decode()
    return "\n".join(s[i : i + width] for i in range(0, len(s), width))


def multipart(parts, boundary="b1", preamble=""):
    out = preamble
    for headers, body in parts:
        out += f"--{boundary}\n" + "\n".join(headers) + "\n\n" + body.rstrip("\n") + "\n"
    return out + f"--{boundary}--\n"


def text_part(text="See the attached file."):
    return (["Content-Type: text/plain; charset=utf-8"], text)


def attachment(name, data, ctype="application/octet-stream", disposition=None):
    headers = [f"Content-Type: {ctype}", disposition or f'Content-Disposition: attachment; filename="{name}"', "Content-Transfer-Encoding: base64"]
    return (headers, b64(data))


def mixed_headers(frm, subject, mid, boundary="b1", **kw):
    return std(frm, subject, mid, **kw) + ["MIME-Version: 1.0", f'Content-Type: multipart/mixed; boundary="{boundary}"']


def sign(raw, domain, selector="s1", keyname="s1", headers=(b"from", b"to", b"subject", b"date", b"message-id")):
    sig = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key(keyname),
        include_headers=list(headers),
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return sig + raw


def zip_of(members, encrypted=False):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2026, 11, 22, 1, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    data = bytearray(buf.getvalue())
    if encrypted:
        # Set the "encrypted" flag (bit 0) in every local and central header: what an
        # encrypted member looks like to a lister that cannot decrypt it.
        for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(sig)
            while at >= 0:
                data[at + off] |= 1
                at = data.find(sig, at + 4)
    return bytes(data)


def tgz_of(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = SIGNED_AT
            t.addfile(info, io.BytesIO(data))
    # gzip writes the time into its header: make it fixed.
    raw = bytearray(buf.getvalue())
    raw[4:8] = b"\0\0\0\0"
    return bytes(raw)


def pdf(size, seed=1):
    """A PDF-looking file of about `size` bytes, low in entropy so git compresses it."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\nstream\n")
    i = 0
    while len(out) < size - 32:
        out += b"BT /F1 12 Tf 72 %d Td (line %d of report %d) Tj ET\n" % (i % 700, i, seed)
        i += 1
    out += b"endstream\n%%EOF\n"
    return bytes(out)


MZ = b"MZ\x90\x00\x03\x00\x00\x00" + b"This program cannot be run in DOS mode.\r\n" * 4


CASES = []


def case(name, about, raw, sender, domains=(), expect=None, recipients=("bob@served.test",), helo="mail.sender.test", policies=()):
    CASES.append(
        dict(
            name=name,
            about=about,
            raw=raw,
            sender=sender,
            domains=list(domains),
            expect=expect or {},
            recipients=list(recipients),
            helo=helo,
            policies=list(policies),
        )
    )


def accept(*symbols, absent=(), score_max=None, score_min=None, action="accept"):
    e = {"action": action, "symbols": list(symbols), "absent": list(absent)}
    if score_max is not None:
        e["score_max"] = score_max
    if score_min is not None:
        e["score_min"] = score_min
    return e


def refuse(action, code, status, text, *symbols, absent=()):
    return {"action": action, "code": code, "status": status, "text": text, "symbols": list(symbols), "absent": list(absent)}


def dmarc_reject(domain, *symbols):
    return refuse("reject", 550, "5.7.1", f"Message refused: DMARC policy of {domain} says reject", "DMARC_REJECT", *symbols)


def blocked(text, *symbols):
    return refuse("reject", 554, "5.7.1", text, "BLOCKED_ATTACHMENT", *symbols)


def virus(*symbols):
    return refuse("reject", 554, "5.7.1", "Message refused: virus found (Test.EICAR.UNOFFICIAL)", "VIRUS", *symbols)


def quarantine(*symbols, absent=()):
    return {"action": "quarantine", "symbols": list(symbols), "absent": list(absent)}


# The symbols an honest message must never carry.
NOT_SPAM = ["DMARC_FAIL", "DMARC_QUARANTINE", "DMARC_REJECT", "DMARC_POLICY_NONE", "SPF_FAIL", "DKIM_FAIL"]

# ---------------------------------------------------------------- honest mail ----

raw = sign(message(std("Nora <nora@nodmarc.test>", "minutes of the meeting", "m1@nodmarc.test"), "Hello Bob,\n\nthe minutes are below.\n"), "nodmarc.test")
case("honest-no-dmarc-record", "A domain with SPF and DKIM but no DMARC record (NXDOMAIN for _dmarc) is not a DMARC failure.", raw, "nora@nodmarc.test", ["nodmarc.test"], accept("SPF_PASS(-0.5)", "DKIM_PASS(-0.5)", absent=NOT_SPAM + ["DMARC_PASS"], score_max=0.0))

raw = sign(message(std("Nora <nora@nodmarc.test>", "no date here", "m2@nodmarc.test", date=False), "Sent by a script that writes no Date.\n"), "nodmarc.test", headers=(b"from", b"to", b"subject", b"message-id"))
case("honest-no-dmarc-no-date", "No DMARC record and no Date: one header symbol, never spam (the false positive of issue 13).", raw, "nora@nodmarc.test", ["nodmarc.test"], accept("MISSING_DATE(1.0)", "SPF_PASS", absent=NOT_SPAM, score_max=1.0))

raw = message(std("Sam <sam@spfonly.test>", "invoice 2026-11", "m3@spfonly.test"), "Your invoice is attached in the portal.\n")
case("honest-spf-only", "A domain that publishes SPF only (no DKIM, no DMARC) is accepted on its SPF pass.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS(-0.5)", absent=NOT_SPAM, score_max=0.0))

raw = message(["From: sam@spfonly.test", "To: bob@served.test", "Subject: ping"], "ping\n")
case("honest-spf-only-bare-headers", "SPF only, and neither Date nor Message-ID: scored for the missing fields, still delivered.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", "MISSING_DATE", "MISSING_MID", absent=NOT_SPAM, score_max=2.0))

raw = sign(message(std("Hana <hana@honest.test>", "quarterly numbers", "m5@honest.test"), "Numbers attached next week.\n"), "honest.test")
case("honest-dmarc-reject-aligned", "A p=reject domain whose mail passes SPF, DKIM and DMARC aligned scores the three bonuses once each.", raw, "hana@honest.test", ["honest.test"], accept("SPF_PASS(-0.5)", "DKIM_PASS(-0.5)", "DMARC_PASS(-0.5)", absent=NOT_SPAM, score_max=-1.5))

raw = sign(message(std("Kai <kai@key2048.test>", "long key", "m6@key2048.test"), "Signed with a 2048-bit key published as two TXT strings.\n"), "key2048.test", selector="big", keyname="big")
case("honest-dkim-2048-split-txt", "A 2048-bit DKIM key split into two TXT strings (as real zones publish it) verifies.", raw, "kai@key2048.test", ["key2048.test"], accept("DKIM_PASS(-0.5)", "DMARC_PASS", absent=NOT_SPAM))

raw = sign(message(std("Hana <hana@honest.test>", "relaxed whitespace", "m7@honest.test"), "Trailing spaces   \nand\ttabs survive relaxed canonicalization.   \n\n\n"), "honest.test")
case("honest-dkim-relaxed-whitespace", "Relaxed canonicalization: trailing white space and blank lines at the end of the body keep the signature valid.", raw, "hana@honest.test", ["honest.test"], accept("DKIM_PASS", "DMARC_PASS", absent=NOT_SPAM))

# A mailing list: the author's signature is broken by the list's subject tag and footer.
orig = sign(message(std("Ann <ann@author.test>", "meeting notes", "m8@author.test", to="dev@list.test"), "Notes attached.\n"), "author.test")
listed = orig.replace(b"Subject: meeting notes", b"Subject: [dev] meeting notes") + crlf("-- \ndev mailing list\nhttps://list.test/dev\n")
listed = crlf("List-Id: <dev.list.test>\nList-Unsubscribe: <mailto:dev-leave@list.test>\nPrecedence: list\n") + listed
case("honest-mailing-list-broken-dkim", "A mailing list that tags the Subject and adds a footer breaks the author's DKIM signature (author p=none): delivered.", listed, "dev-bounces@list.test", ["author.test", "list.test"], accept("DMARC_POLICY_NONE(0.1)", absent=["DMARC_FAIL", "DMARC_QUARANTINE", "DMARC_REJECT", "SPF_FAIL", "DKIM_PASS"], score_max=3.9))

rewritten = listed.replace(b"From: Ann <ann@author.test>", b"From: Ann via dev <dev@list.test>\r\nReply-To: Ann <ann@author.test>")
rewritten = sign(rewritten, "list.test", headers=(b"from", b"to", b"subject", b"date", b"message-id", b"list-id"))
case("honest-mailing-list-from-rewritten", "A list that rewrites From to its own p=reject domain and re-signs passes DMARC, though the author's signature broke.", rewritten, "dev-bounces@list.test", ["author.test", "list.test"], accept("DMARC_PASS", "SPF_PASS", absent=["DMARC_FAIL", "DMARC_QUARANTINE", "DMARC_REJECT", "SPF_FAIL"], score_max=3.9))

orig = sign(message(std("Otto <otto@origin.test>", "travel plans", "m10@origin.test", to="bob@fwd.test"), "See you on Monday.\n"), "origin.test")
fwd = crlf("Received: from mail.origin.test (mail.origin.test [192.0.2.20]) by mx.fwd.test with ESMTPS id 4F2; Sun, 22 Nov 2026 01:00:01 +0000\n") + orig
case("honest-forwarded-dkim-intact", "Plain forwarding (SRS envelope of the forwarder) keeps the author's DKIM signature: DMARC of the p=reject author passes by DKIM.", fwd, "SRS0=ab12=XY=origin.test=otto@fwd.test", ["origin.test", "fwd.test"], accept("DKIM_PASS", "DMARC_PASS", absent=NOT_SPAM))

# Forwarded with a footer (DKIM broken) and an ARC seal by the forwarder.
orig = sign(message(std("Ada <ada@arcauthor.test>", "photos", "m11@arcauthor.test", to="bob@fwd.test"), "Photos on the share.\n"), "arcauthor.test")
withar = crlf("Authentication-Results: fwd.test; dkim=pass header.d=arcauthor.test; spf=pass smtp.mailfrom=arcauthor.test; dmarc=pass header.from=arcauthor.test\n") + orig + crlf("--\nForwarded by fwd.test\n")
seal = dkim.arc_sign(withar, b"s1", b"fwd.test", key("s1"), b"fwd.test", timestamp=SIGNED_AT)
arc = b"".join(seal) + withar
case("honest-forwarded-arc", "A forwarder that adds a footer (the author's signature breaks, author p=none) and seals ARC: the chain verifies and the message is delivered.", arc, "SRS0=cd34=ZW=arcauthor.test=ada@fwd.test", ["arcauthor.test", "fwd.test"], accept("ARC_PASS", absent=["DMARC_FAIL", "DMARC_QUARANTINE", "DMARC_REJECT", "SPF_FAIL", "ARC_FAIL"], score_max=3.9))

big = pdf(3 * 1024 * 1024, 1)
raw = message(mixed_headers("Sam <sam@spfonly.test>", "the 3 MB report", "m12@spfonly.test"), multipart([text_part("The report is attached."), attachment("report.pdf", big, "application/pdf")]))
case("honest-large-pdf-3mb", "A 3 MB PDF from an SPF-only domain is delivered unchanged.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM + ["CLAMAV_OVERSIZE", "CLAMAV_PARTIAL", "ARCHIVE_BOMB"], score_max=0.0))

z = zip_of([(f"scan-{i}.pdf", pdf(400 * 1024, i)) for i in range(5)])
raw = message(mixed_headers("Sam <sam@spfonly.test>", "scans", "m13@spfonly.test"), multipart([text_part("Five scans, zipped."), attachment("scans.zip", z, "application/zip"), attachment("cover.pdf", pdf(1536 * 1024, 9), "application/pdf")]))
case("honest-large-zip-and-pdf", "A zip of five PDFs and a 1.5 MB PDF (highly compressible, below attachments.archive_max_ratio) are delivered.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM + ["ARCHIVE_BOMB", "BLOCKED_ATTACHMENT", "ARCHIVE_UNSCANNABLE"], score_max=0.0))

raw = message(
    [
        "from:   Sam   <sam@spfonly.test>",
        "TO: bob@served.test",
        "subject: =?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=",
        "message-id: <m14@spfonly.test>",
        "X-Mailer: an old client",
        "Received: from laptop (unknown [10.0.0.7])",
        "\tby mail.spfonly.test with ESMTP;",
        "\tSun, 22 Nov 2026 00:59:00 +0000",
    ],
    "Folded Received, odd casing, an encoded Subject and no Date.\n",
)
case("honest-unusual-formatting", "Lower- and upper-case field names, folded fields, an encoded Subject and no Date are legitimate.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", "MISSING_DATE", absent=NOT_SPAM, score_max=1.0))

raw = message(std("=?UTF-8?Q?J=C3=B6rg?= <joerg@spfonly.test>", "Grüße aus Köln", "m15@spfonly.test", extra=["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]), "Schöne Grüße, 😀\n")
case("honest-utf8-8bit", "UTF-8 in the Subject and an 8bit body are legitimate.", raw, "joerg@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM, score_max=0.0))

raw = message(
    ["From: Mail Delivery System <MAILER-DAEMON@mail.sender.test>", "To: bob@served.test", "Subject: Undelivered Mail Returned to Sender", f"Date: {DATE}", "Message-ID: <dsn1@mail.sender.test>", "MIME-Version: 1.0", 'Content-Type: multipart/report; report-type=delivery-status; boundary="r1"'],
    multipart(
        [
            (["Content-Type: text/plain"], "Your message could not be delivered."),
            (["Content-Type: message/delivery-status"], "Reporting-MTA: dns; mail.sender.test\n\nFinal-Recipient: rfc822; gone@elsewhere.test\nAction: failed\nStatus: 5.1.1"),
            (["Content-Type: text/rfc822-headers"], "From: bob@served.test\nTo: gone@elsewhere.test\nSubject: hello"),
        ],
        boundary="r1",
    ),
)
case("honest-bounce-null-sender", "A delivery status notification with the null sender is delivered (there is no envelope domain to check).", raw, "", [], accept(absent=NOT_SPAM, score_max=1.0))

raw = message(
    mixed_headers("Sam <sam@spfonly.test>", "meeting invitation", "m17@spfonly.test"),
    multipart([text_part("Invitation attached."), (["Content-Type: text/calendar; method=REQUEST; charset=utf-8", 'Content-Disposition: attachment; filename="invite.ics"'], "BEGIN:VCALENDAR\nVERSION:2.0\nMETHOD:REQUEST\nBEGIN:VEVENT\nSUMMARY:Review\nDTSTART:20261123T100000Z\nEND:VEVENT\nEND:VCALENDAR")]),
)
case("honest-calendar-invite", "A calendar invitation (text/calendar, invite.ics) is delivered.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM + ["BLOCKED_ATTACHMENT"], score_max=0.0))

png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
raw = message(
    std("Sam <sam@spfonly.test>", "newsletter", "m18@spfonly.test", extra=["MIME-Version: 1.0", 'Content-Type: multipart/related; boundary="rel"']),
    multipart(
        [
            (["Content-Type: text/html; charset=utf-8"], '<html><body><p>News</p><img src="cid:logo@spfonly.test"></body></html>'),
            (["Content-Type: image/png", "Content-ID: <logo@spfonly.test>", 'Content-Disposition: inline; filename="logo.png"', "Content-Transfer-Encoding: base64"], b64(png)),
        ],
        boundary="rel",
    ),
)
case("honest-html-inline-image", "HTML with an inline image referenced by Content-ID is delivered.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM + ["BLOCKED_ATTACHMENT", "FILENAME_BIDI"], score_max=0.0))

raw = message(mixed_headers("Sam <sam@spfonly.test>", "the tools", "m19@spfonly.test"), multipart([text_part("Sources attached."), attachment("tools.tar.gz", tgz_of([("tools/README.md", b"# Tools\n"), ("tools/build.sh.txt", b"echo build\n")]), "application/gzip")]))
case("honest-tar-gz-sources", "A tar.gz of harmless files is listed and delivered.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM + ["BLOCKED_ATTACHMENT", "ARCHIVE_UNSCANNABLE"], score_max=0.0))

raw = message(std("Sam <sam@spfonly.test>", "multiple recipients", "m20@spfonly.test", to="bob@served.test, carol@served.test"), "To both of you.\n")
case("honest-two-recipients", "One message for two local recipients gets one verdict.", raw, "sam@spfonly.test", ["spfonly.test"], accept("SPF_PASS", absent=NOT_SPAM, score_max=0.0), recipients=("bob@served.test", "carol@served.test"))

raw = sign(message(std("Pat <pat@partner.test>", "contract", "m21@partner.test"), "The contract, as agreed.\n"), "partner.test")
case("honest-allow-policy-authenticated", "A sender allow for *@partner.test applies to mail that really is from partner.test (SPF pass).", raw, "pat@partner.test", ["partner.test"], accept("POLICY_ALLOW", absent=["POLICY_ALLOW_UNAUTHENTICATED"]), policies=["allow-partner"])

# ------------------------------------------------------------------- spoofs ----

raw = message(std("CEO <ceo@honest.test>", "wire the money", "s1@attacker.test"), "Urgent.\n")
case("spoof-dmarc-reject", "A spoof of a p=reject domain (envelope the attacker's, SPF pass for it) is refused by DMARC.", raw, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(std("CEO <ceo@strict.test>", "wire the money", "s2@strict.test"), "Urgent.\n")
case("spoof-dmarc-reject-spf-fail", "A spoof using the p=reject domain in the envelope too fails SPF and is refused by DMARC.", raw, "ceo@strict.test", ["strict.test"], dmarc_reject("strict.test"))

raw = message(std("CEO <ceo@HONEST.TEST>", "upper case", "s3@attacker.test"), "Urgent.\n")
case("spoof-dmarc-reject-upper-case", "Upper case in the From domain does not escape its p=reject policy.", raw, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(std("=?UTF-8?B?Q0VP?= <ceo@honest.test>", "encoded name", "s4@attacker.test"), "Urgent.\n")
case("spoof-dmarc-reject-encoded-name", "An encoded display name does not hide the From domain from DMARC.", raw, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(std("Payroll <payroll@quar.test>", "update your bank details", "s5@attacker.test"), "Click here.\n")
case("spoof-dmarc-quarantine", "A spoof of a p=quarantine domain is quarantined, whatever else it scores.", raw, "mallory@attacker.test", ["quar.test", "attacker.test"], quarantine("DMARC_QUARANTINE"))

raw = sign(message(std("Payroll <payroll@quar.test>", "update your bank details", "s6@attacker.test"), "Click here.\n"), "attacker.test")
case("spoof-dmarc-quarantine-unaligned-dkim", "A p=quarantine spoof carrying the attacker's own valid signature is still quarantined; the pass offsets nothing.", raw, "mallory@attacker.test", ["quar.test", "attacker.test"], quarantine("DMARC_QUARANTINE", "DKIM_PASS_UNALIGNED(0.0)", absent=["DKIM_PASS"]))

raw = message(std("Sam <sam@spfonly.test>, CEO <ceo@honest.test>", "two authors", "s7@attacker.test"), "Urgent.\n")
case("spoof-two-from-domains", "A From naming a harmless domain and a p=reject one is judged by the strictest policy: refused.", raw, "mallory@attacker.test", ["spfonly.test", "honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(std("CEO <ceo@honest.test>, Payroll <payroll@quar.test>", "two policies", "s8@attacker.test"), "Urgent.\n")
case("spoof-two-from-reject-and-quarantine", "A From naming a p=quarantine and a p=reject domain: the strictest, reject.", raw, "mallory@attacker.test", ["honest.test", "quar.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(["From: Sam <sam@spfonly.test>", "From: CEO <ceo@honest.test>", "To: bob@served.test", "Subject: two From fields", f"Date: {DATE}", "Message-ID: <s9@attacker.test>"], "Urgent.\n")
case("spoof-two-from-fields", "Two From fields, the second a p=reject domain: never delivered clean.", raw, "mallory@attacker.test", ["spfonly.test", "honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(["To: bob@served.test", "Subject: no author", f"Date: {DATE}", "Message-ID: <s10@attacker.test>"], "Who sent this?\n")
case("spoof-no-from", "No From at all: its own strong symbol, never a message that scores nothing.", raw, "mallory@attacker.test", ["attacker.test"], {"action": "tag", "symbols": ["NO_FROM", "MISSING_FROM"], "absent": ["DMARC_PASS"], "score_min": 4.0})

raw = message(["From:", "To: bob@served.test", "Subject: empty author", f"Date: {DATE}", "Message-ID: <s11@attacker.test>"], "Who sent this?\n")
case("spoof-empty-from", "An empty From field is no author either.", raw, "mallory@attacker.test", ["attacker.test"], {"action": "tag", "symbols": ["NO_FROM(3.0)", "MISSING_FROM(2.0)"], "absent": ["DMARC_PASS"], "score_min": 4.0})

raw = message(std("Hana <hana@honest.test>", "replayed", "s12@attacker.test"), "Replayed body.\n")
raw = raw.replace(b"Subject: replayed", b"Subject: replayed") 
signed = sign(message(std("Hana <hana@honest.test>", "original", "s12@honest.test"), "Original body.\n"), "honest.test")
tampered = signed.replace(b"Original body.", b"Changed body!!")
case("spoof-tampered-body", "A signed p=reject message whose body was changed after signing fails DKIM and, sent from elsewhere, DMARC.", tampered, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

# ------------------------------------------------------------------- gaming ----

one = sign(message(std("CEO <ceo@honest.test>", "stacked", "g1@attacker.test"), "Urgent.\n"), "attacker.test")
sig, rest = one.split(b"\r\nFrom:", 1)
stacked = (sig + b"\r\n") * 30 + b"From:" + rest
case("gaming-stacked-signatures-reject", "30 copies of the attacker's own valid signature on a p=reject spoof: refused, and the extra signatures are not verified.", stacked, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

one = sign(message(std("Payroll <payroll@quar.test>", "stacked", "g2@attacker.test"), "Click.\n"), "attacker.test")
sig, rest = one.split(b"\r\nFrom:", 1)
stacked = (sig + b"\r\n") * 30 + b"From:" + rest
case("gaming-stacked-signatures-quarantine", "30 copies of a valid unaligned signature cannot buy a p=quarantine spoof out of quarantine (it scored -9.5 before issue 13).", stacked, "mallory@attacker.test", ["quar.test", "attacker.test"], quarantine("DMARC_QUARANTINE", "DKIM_TOO_MANY(1.0)", absent=["DKIM_PASS"]))

one = sign(message(["From: Mallory <mallory@attacker.test>", "To: bob@served.test", "Subject: cheap pills"], "Buy now.\n"), "attacker.test", headers=(b"from", b"to", b"subject"))
sig, rest = one.split(b"\r\nFrom:", 1)
stacked = (sig + b"\r\n") * 20 + b"From:" + rest
case("gaming-stacked-own-domain", "20 copies of the sender's own aligned signature earn the DKIM bonus once and cost DKIM_TOO_MANY: the score cannot be bought down.", stacked, "mallory@attacker.test", ["attacker.test"], accept("DKIM_TOO_MANY(1.0)", "DKIM_PASS(-0.5)", "MISSING_DATE", "MISSING_MID", score_min=1.5, score_max=1.5))

a = sign(message(std("CEO <ceo@honest.test>", "two signers", "g4@attacker.test"), "Urgent.\n"), "attacker.test")
b = sign(a, "partner.test")
case("gaming-two-unaligned-signers", "Valid signatures of two unrelated domains do not add up to an aligned pass: a p=reject spoof is refused.", b, "mallory@attacker.test", ["honest.test", "attacker.test", "partner.test"], dmarc_reject("honest.test"))

raw = message(
    ["Authentication-Results: mx.served.test; dkim=pass header.d=honest.test; spf=pass smtp.mailfrom=honest.test; dmarc=pass header.from=honest.test"] + std("CEO <ceo@honest.test>", "forged results", "g5@attacker.test"),
    "Trust me.\n",
)
case("gaming-forged-auth-results-reject", "A forged Authentication-Results claiming dmarc=pass for a p=reject domain changes nothing: refused.", raw, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(
    ["Authentication-Results : mx.served.test; dkim=pass header.d=quar.test; dmarc=pass header.from=quar.test"] + std("Payroll <payroll@quar.test>", "forged results, space before colon", "g6@attacker.test"),
    "Trust me.\n",
)
case("gaming-forged-auth-results-space-colon", "A forged `Authentication-Results :` (white space before the colon) claiming a pass: quarantined, and the forgery removed.", raw, "mallory@attacker.test", ["quar.test", "attacker.test"], quarantine("DMARC_QUARANTINE"))

raw = message(
    ["Authentication-Results: mx.served.test; spf=pass smtp.mailfrom=spfonly.test", "X-Spam-Status: No, score=-10.0 required=5.0 tests=[ALL_TRUSTED]", "X-Spam-Flag: NO", "X-Spam-Score: -10.0", "X-Spam-Level: ", "X-Spam: No"]
    + std("FORGED <mallory@attacker.test>", "forged status fields", "g7@attacker.test"),
    "Nothing to see.\n",
)
case("gaming-forged-spam-headers-clean", "Forged X-Spam-Status/Flag/Score/Level, X-Spam and Authentication-Results on a clean message are all removed before delivery.", raw, "mallory@attacker.test", ["attacker.test"], accept("SPF_PASS", score_max=0.0))

raw = message(
    ["X-Spam-Status: No, score=-10.0 required=5.0 tests=[ALL_TRUSTED]", "X-Spam-Flag: NO", "X-Spam-Level: ", "X-Spam-Score: -10.0"]
    + ["From: FORGED <mallory@farpartner.test>", "To: bob@served.test", "Subject: pills"],
    "Buy now.\n",
)
case("gaming-forged-spam-headers-spam", "A message that scores over the tag threshold is tagged however many forged X-Spam fields say it is clean.", raw, "mallory@farpartner.test", ["farpartner.test"], {"action": "tag", "symbols": ["SPF_FAIL(3.0)", "MISSING_DATE"], "score_min": 4.0}, policies=["allow-farpartner"])

raw = message(
    ["X-Spam-Flag: NO", "X-Spam-Status: No, score=-100.0", "Authentication-Results: mx.served.test; dkim=pass"] + mixed_headers("FORGED <mallory@attacker.test>", "forged clean verdict", "g9@attacker.test"),
    multipart([text_part("Read me."), attachment("readme.txt", EICAR, "text/plain")]),
)
case("gaming-forged-spam-headers-virus", "A virus with forged clean X-Spam and Authentication-Results fields is refused.", raw, "mallory@attacker.test", ["attacker.test"], virus())

raw = message(
    [
        "ARC-Seal: i=1; a=rsa-sha256; t=1795827600; cv=none; d=honest.test; s=s1; b=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=honest.test; s=s1; t=1795827600; h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "ARC-Authentication-Results: i=1; honest.test; dkim=pass header.d=honest.test; dmarc=pass header.from=honest.test",
    ]
    + std("CEO <ceo@honest.test>", "forged ARC", "g10@attacker.test"),
    "Sealed by nobody.\n",
)
case("gaming-forged-arc-chain", "A forged ARC set claiming dmarc=pass (signatures that do not verify) does not rescue a p=reject spoof.", raw, "mallory@attacker.test", ["honest.test", "attacker.test"], dmarc_reject("honest.test"))

raw = message(
    [
        "Received: from mail.quar.test (mail.quar.test [192.0.2.40]) by mx.served.test with ESMTPS; Sun, 22 Nov 2026 00:59:00 +0000",
        "Received: from localhost (localhost [127.0.0.1]) by mail.quar.test; Sun, 22 Nov 2026 00:58:00 +0000",
    ]
    + std("Payroll <payroll@quar.test>", "forged Received", "g11@attacker.test"),
    "Internal mail, honest.\n",
)
case("gaming-forged-received", "Forged Received fields claiming the message came from the domain's own servers change nothing: quarantined.", raw, "mallory@attacker.test", ["quar.test", "attacker.test"], quarantine("DMARC_QUARANTINE"))

raw = message(["From: Pat <pat@farpartner.test>", "To: bob@served.test", "Subject: cheap pills", "Message-ID: <g12@farpartner.test>"], "Buy now.\n")
case("gaming-allow-forged-envelope", "An allow policy for *@farpartner.test does not apply to an envelope sender that fails farpartner.test's SPF: scored, tagged.", raw, "pat@farpartner.test", ["farpartner.test"], {"action": "tag", "symbols": ["SPF_FAIL(3.0)", "MISSING_DATE"], "absent": ["POLICY_ALLOW"], "score_min": 4.0}, policies=["allow-farpartner"])

raw = sign(message(mixed_headers("Pat <pat@partner.test>", "invoice", "g13@partner.test"), multipart([text_part(), attachment("invoice.txt", EICAR, "text/plain")])), "partner.test")
case("gaming-allow-authenticated-virus", "An authenticated allow-listed sender's virus is still refused (allow never skips the antivirus).", raw, "pat@partner.test", ["partner.test"], virus(), policies=["allow-partner"])

raw = sign(message(mixed_headers("Pat <pat@partner.test>", "tool", "g14@partner.test"), multipart([text_part(), attachment("tool.exe", MZ)])), "partner.test")
case("gaming-allow-authenticated-exe", "An authenticated allow-listed sender's .exe is still refused (allow never skips attachment rules).", raw, "pat@partner.test", ["partner.test"], blocked('Message refused: attachment "tool.exe" is of a blocked type'), policies=["allow-partner"])

raw = message(std("CEO <ceo@honest.test>", "via the partner", "g15@partner.test"), "Urgent.\n")
case("gaming-allow-authenticated-spoofed-from", "An allow-listed, SPF-authenticated envelope sender cannot carry a spoofed From of a p=reject domain past DMARC.", raw, "pat@partner.test", ["partner.test", "honest.test"], dmarc_reject("honest.test"), policies=["allow-partner"])

raw = message(["From: Mallory <mallory@farpartner.test>", "To: vip@served.test, bob@served.test", "Subject: pills", "Message-ID: <g16@farpartner.test>"], "Buy now.\n")
case("gaming-allow-one-recipient", "An allow for one recipient (vip@) does not exempt the other recipient of the same message: scored and tagged.", raw, "mallory@farpartner.test", ["farpartner.test"], {"action": "tag", "symbols": ["SPF_FAIL(3.0)"], "absent": ["POLICY_ALLOW"], "score_min": 4.0}, recipients=("vip@served.test", "bob@served.test"), policies=["allow-vip", "allow-farpartner"])

# -------------------------------------------------------- attachment tricks ----

def att_case(name, about, part, expect, subject=None, extra_parts=()):
    raw = message(mixed_headers("Sam <sam@spfonly.test>", subject or name, f"{name}@spfonly.test"), multipart([text_part()] + list(extra_parts) + [part]))
    case(name, about, raw, "sam@spfonly.test", ["spfonly.test"], expect)


att_case("attach-inline-text-named-exe", "A text/plain part with Content-Disposition: inline; filename=\"x.exe\" is checked like any attachment.", (["Content-Type: text/plain", 'Content-Disposition: inline; filename="x.exe"'], "MZ pretend"), blocked('Message refused: attachment "x.exe" is of a blocked type'))
att_case("attach-type-name-only", "A file name given only as the Content-Type name (no Content-Disposition) counts.", (['Content-Type: application/octet-stream; name="setup.scr"', "Content-Transfer-Encoding: base64"], b64(MZ)), blocked('Message refused: attachment "setup.scr" is of a blocked type'))
att_case("attach-rfc2231-encoded", "An RFC 2231 encoded name (filename*=UTF-8''...%2Eexe) is decoded before its extension is read.", (["Content-Type: application/octet-stream", "Content-Disposition: attachment; filename*=UTF-8''invoice%2Eexe", "Content-Transfer-Encoding: base64"], b64(MZ)), blocked('Message refused: attachment "invoice.exe" is of a blocked type'))
att_case("attach-rfc2231-continuation", "An RFC 2231 name split into continuations (filename*0, filename*1) is joined before it is judged.", (["Content-Type: application/octet-stream", 'Content-Disposition: attachment; filename*0="inv"; filename*1="oice.e"; filename*2="xe"', "Content-Transfer-Encoding: base64"], b64(MZ)), blocked('Message refused: attachment "invoice.exe" is of a blocked type'))
att_case("attach-rfc2047-name", "An RFC 2047 encoded name (=?UTF-8?B?...?=) is decoded before it is judged.", ([f'Content-Type: application/octet-stream; name="=?UTF-8?B?{base64.b64encode(b"payload.js").decode()}?="', "Content-Transfer-Encoding: base64"], b64(b"alert(1)")), blocked('Message refused: attachment "payload.js" is of a blocked type'))
att_case("attach-trailing-dots-spaces", "Trailing dots and spaces (which Windows drops) do not hide an .exe.", (["Content-Type: application/octet-stream", 'Content-Disposition: attachment; filename="invoice.exe. . "', "Content-Transfer-Encoding: base64"], b64(MZ)), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-uppercase-extension", "Upper case does not hide a blocked extension (INVOICE.EXE).", attachment("INVOICE.EXE", MZ), blocked('Message refused: attachment "INVOICE.EXE" is of a blocked type'))
att_case("attach-double-extension", "A double extension (invoice.pdf.exe) is the last extension's type.", attachment("invoice.pdf.exe", MZ), blocked('Message refused: attachment "invoice.pdf.exe" is of a blocked type'))
att_case("attach-bidi-rlo-exe", "A right-to-left override that makes invoice\\u202Efdp.exe look like invoiceexe.pdf: the real extension is blocked.", (["Content-Type: application/octet-stream", "Content-Disposition: attachment; filename*=UTF-8''invoice%E2%80%AEfdp.exe", "Content-Transfer-Encoding: base64"], b64(MZ)), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-bidi-rlo-allowed-type", "A right-to-left override in an otherwise allowed name (report\\u202Efdp.txt) is a disguise: FILENAME_BIDI, quarantined.", (["Content-Type: text/plain", "Content-Disposition: attachment; filename*=UTF-8''report%E2%80%AEfdp.txt"], "just text"), quarantine("FILENAME_BIDI(6.0)", "SPF_PASS(-0.5)"))
att_case("attach-zip-blocked-member", "A zip holding a .js member is refused.", attachment("docs.zip", zip_of([("readme.txt", b"read me"), ("run.js", b"WScript.Echo(1)")]), "application/zip"), blocked('Message refused: archive "docs.zip" holds "run.js", a blocked type'))
att_case("attach-zip-prepended-data", "A zip after 4 KB of leading data (a self-extractor, a polyglot) is found through its end of central directory: its .exe is refused.", attachment("photo.zip", b"\xff\xd8\xff\xe0JFIF" + bytes(range(256)) * 16 + zip_of([("setup.exe", MZ)]), "application/zip"), blocked('Message refused: archive "photo.zip" holds "setup.exe", a blocked type'))
att_case("attach-zip-nested", "A zip in a zip in a zip: the .scr three levels down is refused.", attachment("outer.zip", zip_of([("middle.zip", zip_of([("inner.zip", zip_of([("screen.scr", MZ)]))]))]), "application/zip"), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-tar-gz-exe", "A tar.gz holding an .exe is listed and refused.", attachment("update.tar.gz", tgz_of([("update/setup.exe", MZ)]), "application/gzip"), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-zip-encrypted", "An encrypted zip cannot be listed: ENCRYPTED_ARCHIVE (attachments.encrypted_action = score by default).", attachment("secret.zip", zip_of([("secret.pdf", pdf(2000))], encrypted=True), "application/zip"), {"action": "accept", "symbols": ["ENCRYPTED_ARCHIVE"]})
att_case("attach-rar-unscannable", "A RAR archive, recognised by its magic and not listable: ARCHIVE_UNSCANNABLE (attachments.unscannable_action = score by default).", attachment("files.rar", b"Rar!\x1a\x07\x00" + bytes(200), "application/x-rar-compressed"), {"action": "accept", "symbols": ["ARCHIVE_UNSCANNABLE"]})
att_case("attach-renamed-zip", "A zip named .pdf is still opened by its content: the .exe in it is refused.", attachment("statement.pdf", zip_of([("statement.exe", MZ)]), "application/pdf"), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-eicar-plain", "EICAR as a plain attachment: clamd finds it.", attachment("eicar.txt", EICAR, "text/plain"), virus())
att_case("attach-eicar-nested-zip", "EICAR in a zip in a zip: clamd unpacks and finds it.", attachment("nested.zip", zip_of([("inner.zip", zip_of([("eicar.txt", EICAR)]))]), "application/zip"), virus())
att_case("attach-eicar-prepended-zip", "EICAR in a zip after 4 KB of leading data: found.", attachment("picture.zip", b"GIF89a" + bytes(range(256)) * 16 + zip_of([("eicar.txt", EICAR)]), "application/zip"), virus())
att_case("attach-eicar-tar-gz", "EICAR in a tar.gz: found.", attachment("logs.tar.gz", tgz_of([("logs/eicar.txt", EICAR)]), "application/gzip"), virus())
att_case("attach-eicar-in-attached-message", "EICAR in an attachment of an attached message (message/rfc822): found.", (["Content-Type: message/rfc822", 'Content-Disposition: attachment; filename="fwd.eml"'], message(mixed_headers("x@spfonly.test", "inner", "inner@spfonly.test", boundary="in"), multipart([text_part(), attachment("eicar.txt", EICAR, "text/plain")], boundary="in")).decode()), virus())
att_case("attach-exe-in-attached-message", "An .exe in an attached message is refused.", (["Content-Type: message/rfc822"], message(mixed_headers("x@spfonly.test", "inner", "inner2@spfonly.test", boundary="in"), multipart([text_part(), attachment("payload.exe", MZ)], boundary="in")).decode()), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})
att_case("attach-honest-zip-pdfs", "A zip of PDFs is listed and delivered.", attachment("statements.zip", zip_of([("jan.pdf", pdf(3000, 1)), ("feb.pdf", pdf(3000, 2))]), "application/zip"), accept("SPF_PASS", absent=NOT_SPAM + ["BLOCKED_ATTACHMENT", "ENCRYPTED_ARCHIVE", "ARCHIVE_UNSCANNABLE"], score_max=0.0))
att_case("attach-zip-bomb", "A zip whose member expands a thousand-fold is a zip bomb: ARCHIVE_BOMB.", attachment("data.zip", zip_of([("zeros.txt", bytes(4 * 1024 * 1024))]), "application/zip"), quarantine("ARCHIVE_BOMB(10.0)"))

# ----------------------------------------------------------- malformed MIME ----

def mime_case(name, about, headers, body, expect, sender="sam@spfonly.test"):
    raw = message(headers, body) if isinstance(body, str) else crlf("\n".join(headers) + "\n\n") + body
    case(name, about, raw, sender, ["spfonly.test"], expect)


h = std("Sam <sam@spfonly.test>", "no boundary", "x1@spfonly.test") + ["MIME-Version: 1.0", "Content-Type: multipart/mixed"]
mime_case("mime-missing-boundary", "multipart/mixed without a boundary parameter cannot be split into parts (by us or by a mail client): the .exe header inside is body text, and the message is delivered alike in every mode (recorded behaviour, see README.md).", h, multipart([text_part(), attachment("hidden.exe", MZ)], boundary="zz"), accept("SPF_PASS", absent=["BLOCKED_ATTACHMENT"]))

h = mixed_headers("Sam <sam@spfonly.test>", "unterminated", "x2@spfonly.test")
body = multipart([text_part(), attachment("run.exe", MZ)]).rsplit("--b1--", 1)[0]
mime_case("mime-unterminated-multipart", "A multipart with no closing boundary: the last part's .exe is still seen.", h, body, blocked('Message refused: attachment "run.exe" is of a blocked type'))

h = mixed_headers("Sam <sam@spfonly.test>", "bad base64", "x3@spfonly.test")
bad = b64(EICAR)
bad = bad[:20] + "!!\n##" + bad[20:] + "=="
mime_case("mime-bad-base64", "Base64 with characters outside the alphabet around an EICAR: decoded leniently, found.", h, multipart([text_part(), (["Content-Type: text/plain", 'Content-Disposition: attachment; filename="a.txt"', "Content-Transfer-Encoding: base64"], bad)]), virus())

h = mixed_headers("Sam <sam@spfonly.test>", "bad base64 harmless", "x4@spfonly.test")
mime_case("mime-bad-base64-harmless", "A harmless attachment with broken base64 is delivered (no false positive on a decoding error).", h, multipart([text_part(), (["Content-Type: application/pdf", 'Content-Disposition: attachment; filename="a.pdf"', "Content-Transfer-Encoding: base64"], "JVBERi0xLjQK***not base64 at all***\n")]), accept("SPF_PASS", absent=NOT_SPAM + ["BLOCKED_ATTACHMENT"], score_max=0.0))

h = std("Sam <sam@spfonly.test>", "x" * 900, "x5@spfonly.test") + ["X-Long: " + "y" * 950]
mime_case("mime-long-header-lines", "Header lines close to the 998-octet limit are legitimate.", h, "Long lines above.\n", accept("SPF_PASS", absent=NOT_SPAM, score_max=0.0))

h = std("Sam <sam@spfonly.test>", "huge folded header", "x6@spfonly.test") + ["X-Huge: " + "\n ".join(["z" * 70] * 1500)]
mime_case("mime-huge-folded-header", "A 100 KB header field folded over 1500 lines neither crashes nor hides the message: delivered.", h, "Body.\n", accept("SPF_PASS", absent=NOT_SPAM, score_max=0.0))

h = std("Sam <sam@spfonly.test>", "NUL bytes", "x7@spfonly.test")
UNSENDABLE_NUL = refuse("reject", 554, "5.6.0", "Error: message contains a NUL byte")
body = multipart([text_part("nul here: @"), attachment("eicar.txt", EICAR, "text/plain")])
mime_case("mime-nul-before-eicar", "NUL bytes ahead of an EICAR attachment: refused for the NUL, alike in every mode (mb-smtpd refuses it while reading DATA).", mixed_headers("Sam <sam@spfonly.test>", "NUL then EICAR", "x7@spfonly.test"), crlf(body).replace(b"@", b"\x00"), UNSENDABLE_NUL)

h = std("Sam <sam@spfonly.test>", "NUL bytes harmless", "x8@spfonly.test")
mime_case("mime-nul-harmless", "NUL bytes in a harmless body: refused alike in every mode, with mb-smtpd's words.", h, b"text\x00with\x00NULs\r\n", UNSENDABLE_NUL)

h = std("Sam <sam@spfonly.test>", "a 2000-character header line", "x8b@spfonly.test") + ["X-Huge-Line: " + "w" * 2000]
mime_case("mime-header-line-over-998", "A 2000-character header line (RFC 5322 allows 998): refused alike in every mode, with mb-smtpd's words.", h, "Body.\n", refuse("reject", 554, "5.6.0", "Error: message has a line longer than 998 characters"))

h = std("Sam <sam@spfonly.test>", "a 5000-character body line", "x8c@spfonly.test")
mime_case("mime-body-line-over-998", "A 5000-character body line: refused alike in every mode.", h, "v" * 5000 + "\n", refuse("reject", 554, "5.6.0", "Error: message has a line longer than 998 characters"))

h = std("Sam <sam@spfonly.test>", "two content types", "x9@spfonly.test") + ["MIME-Version: 1.0", "Content-Type: text/plain", 'Content-Type: multipart/mixed; boundary="b1"']
mime_case("mime-duplicate-content-type", "Two Content-Type fields (text/plain first, multipart second): the .exe behind the second is still refused.", h, multipart([text_part(), attachment("dup.exe", MZ)]), {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})

h = mixed_headers("Sam <sam@spfonly.test>", "boundary inside", "x10@spfonly.test", boundary="b1")
body = "--b1\nContent-Type: text/plain\n\nnot the end: --b1x\n--b1\n" + "\n".join(attachment("inner.bat", b"@echo off")[0]) + "\n\n" + b64(b"@echo off") + "\n--b1--\n"
mime_case("mime-boundary-prefix-in-text", "A line that starts with the boundary but continues (--b1x) is not a boundary; the .bat after the real one is refused.", h, body, blocked('Message refused: attachment "inner.bat" is of a blocked type'))

h = mixed_headers("Sam <sam@spfonly.test>", "deep nesting", "x11@spfonly.test", boundary="n0")
body = ""
for i in range(40):
    body += f'--n{i}\nContent-Type: multipart/mixed; boundary="n{i+1}"\n\n'
body += "--n40\n" + "\n".join(attachment("deep.vbs", b"MsgBox 1")[0]) + "\n\n" + b64(b"MsgBox 1") + "\n"
for i in range(40, -1, -1):
    body += f"--n{i}--\n"
mime_case("mime-deep-nesting", "40 nested multiparts: the .vbs at the bottom is still found.", h, body, {"action": "reject", "code": 554, "status": "5.7.1", "symbols": ["BLOCKED_ATTACHMENT"]})

mime_case("mime-no-body", "A message that is all header and no body is delivered.", std("Sam <sam@spfonly.test>", "headers only", "x12@spfonly.test"), "", accept("SPF_PASS", absent=NOT_SPAM))

h = std("Sam <sam@spfonly.test>", "qp", "x13@spfonly.test") + ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"]
mime_case("mime-bad-quoted-printable", "Broken quoted-printable (=ZZ, a lone = at the end) is delivered, not refused.", h, "caf=C3=A9 =ZZ and =\nmore=\n", accept("SPF_PASS", absent=NOT_SPAM))

h = mixed_headers("Sam <sam@spfonly.test>", "encoded-word name", "x14@spfonly.test")
mime_case("mime-unknown-transfer-encoding", "An unknown Content-Transfer-Encoding on an .exe part does not hide its name.", h, multipart([text_part(), (["Content-Type: application/octet-stream", 'Content-Disposition: attachment; filename="odd.exe"', "Content-Transfer-Encoding: x-uuencode-ish"], "begin 644 odd.exe\nend")]), blocked('Message refused: attachment "odd.exe" is of a blocked type'))


def toml_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(c):
    records = list(BASE)
    for d in c["domains"]:
        for r in ZONE[d]:
            if r not in records:
                records.append(r)
    lines = [f"# {c['about']}", "dns = ["]
    lines += [f"    {toml_str(r)}," for r in records]
    lines += ["]", "[envelope]", f"sender = {toml_str(c['sender'])}", "recipients = [" + ", ".join(toml_str(r) for r in c["recipients"]) + "]", 'client_ip = "127.0.0.1"', f"helo = {toml_str(c['helo'])}", 'direction = "inbound"', ""]
    for p in c["policies"]:
        pol = POLICIES[p]
        lines += ["[[policy]]", f"name = {toml_str(p)}"] + [f"{k} = {toml_str(v)}" for k, v in pol.items()] + [""]
    e = c["expect"]
    lines.append("[expect]")
    lines.append(f"action = {toml_str(e['action'])}")
    for k in ("code",):
        if k in e:
            lines.append(f"{k} = {e[k]}")
    for k in ("status", "text"):
        if k in e:
            lines.append(f"{k} = {toml_str(e[k])}")
    lines.append("symbols = [" + ", ".join(toml_str(s) for s in e.get("symbols", [])) + "]")
    if e.get("absent"):
        lines.append("absent = [" + ", ".join(toml_str(s) for s in e["absent"]) + "]")
    for k in ("score_min", "score_max"):
        if k in e:
            lines.append(f"{k} = {float(e[k])}")
    with open(os.path.join(HERE, c["name"] + ".case"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, c["name"] + ".eml"), "wb") as f:
        f.write(c["raw"])


def main():
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    for old in os.listdir(HERE):
        if old.endswith((".case", ".eml")) and old.rsplit(".", 1)[0] not in names:
            os.remove(os.path.join(HERE, old))
    for c in CASES:
        write(c)
    print(f"{len(CASES)} cases written to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
