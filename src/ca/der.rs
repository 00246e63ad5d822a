//! Just enough DER to carry a CA's subject into its leaves byte for byte.
//!
//! rcgen rebuilds an issuer's name from a map keyed by attribute type, which
//! keeps one of several `DC=` parts (rcgen issue #300) and may re-encode the
//! rest. Verifiers such as webpki match a leaf's issuer to its CA's subject
//! byte for byte, so a leaf whose issuer differs is unverifiable. Leaves are
//! therefore re-signed with the CA's subject exactly as its certificate
//! encodes it.

use rcgen::SigningKey;
use rustls_pki_types::CertificateDer;

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;
/// The `[0] EXPLICIT` tag of a TBSCertificate's version (absent in v1 certificates).
const VERSION: u8 = 0xa0;

/// The subject name of a certificate, as encoded in it.
pub(super) fn subject(certificate: &[u8]) -> Option<&[u8]> {
    let (fields, issuer) = tbs_fields(certificate)?;
    // issuer, validity, subject
    Some(fields[issuer + 2])
}

/// `certificate` with `issuer_name` as its issuer, signed anew by `key`.
pub(super) fn with_issuer(
    certificate: &[u8],
    issuer_name: &[u8],
    key: &impl SigningKey,
) -> Result<CertificateDer<'static>, rcgen::Error> {
    let malformed = || rcgen::Error::CouldNotParseCertificate;
    let (_, content, _) = split(certificate).ok_or_else(malformed)?;
    let algorithm = match children(content).as_deref() {
        Some([_, algorithm, _]) => *algorithm,
        _ => return Err(malformed()),
    };
    let (mut fields, issuer) = tbs_fields(certificate).ok_or_else(malformed)?;
    fields[issuer] = issuer_name;
    let tbs = encode(SEQUENCE, &fields);
    // A signature's BIT STRING has no unused bits.
    let signature = [&[0][..], &key.sign(&tbs)?].concat();
    let signed = encode(
        SEQUENCE,
        &[&tbs, algorithm, &encode(BIT_STRING, &[&signature])],
    );
    Ok(CertificateDer::from(signed))
}

/// The fields of a certificate's TBSCertificate (whole elements), and the
/// index of its issuer among them.
fn tbs_fields(certificate: &[u8]) -> Option<(Vec<&[u8]>, usize)> {
    let (_, content, _) = split(certificate)?;
    let (_, tbs, _) = split(content)?;
    let fields = children(tbs)?;
    // [version,] serialNumber, signature, issuer, validity, subject, ...
    let issuer = if fields.first()?.first() == Some(&VERSION) {
        3
    } else {
        2
    };
    (fields.len() > issuer + 2).then_some((fields, issuer))
}

/// The DER element at the start of `input`: the whole element, its content,
/// and what follows it.
fn split(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    // Certificates use only one-byte tags.
    if input.first()? & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(1)?;
    let (header, length) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        let length = bytes
            .iter()
            .fold(0usize, |length, &byte| length << 8 | usize::from(byte));
        (2 + count, length)
    };
    let end = header.checked_add(length)?;
    let whole = input.get(..end)?;
    Some((whole, &whole[header..], &input[end..]))
}

/// The elements, whole, that make up a constructed element's content.
fn children(mut content: &[u8]) -> Option<Vec<&[u8]>> {
    let mut elements = Vec::new();
    while !content.is_empty() {
        let (whole, _, rest) = split(content)?;
        elements.push(whole);
        content = rest;
    }
    Some(elements)
}

/// A DER element with `tag` whose content is `parts`, concatenated.
fn encode(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let length: usize = parts.iter().map(|part| part.len()).sum();
    let mut out = Vec::with_capacity(length + 6);
    out.push(tag);
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes = length.to_be_bytes();
        let significant = &bytes[bytes.iter().take_while(|&&byte| byte == 0).count()..];
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_in_short_and_long_form() {
        for length in [0, 1, 0x7f, 0x80, 0xff, 0x100, 70_000] {
            let content = vec![7u8; length];
            let element = encode(SEQUENCE, &[&content]);
            let (whole, inner, rest) = split(&element).unwrap();
            assert_eq!(
                (whole.len(), inner, rest),
                (element.len(), &content[..], &[][..])
            );
        }
    }

    #[test]
    fn truncated_and_indefinite_elements_are_refused() {
        let element = encode(SEQUENCE, &[&[1, 2, 3]]);
        assert!(split(&element[..element.len() - 1]).is_none());
        assert!(split(&[SEQUENCE, 0x80, 0, 0]).is_none());
        assert!(split(&[0x1f, 1, 0]).is_none());
        assert!(subject(&encode(SEQUENCE, &[&encode(SEQUENCE, &[])])).is_none());
    }
}
