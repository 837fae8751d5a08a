//! Byte-level checks that run before FFmpeg parses a file.
//!
//! Why not leave everything to FFmpeg: its demuxers are built to play
//! whatever they can, so a file cut off midway usually "works" and yields a
//! shorter movie, and a header claiming a 30000x30000 picture is either
//! refused with a meaningless errno or accepted and decoded. An uploader
//! deserves "your upload was cut off" and "picture too large" instead, and we
//! want those answers without decoding anything. The container layouts read
//! here are tiny and stable (ISO BMFF box headers, the EBML Segment size, the
//! RIFF size, the YUV4MPEG2 text header), so reading them ourselves is cheap
//! and safe: a few small reads, bounded loops, no allocation driven by the
//! file's claims.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// What the raw bytes say, before any demuxer runs.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Findings {
    /// The file ends before its own structure says it should.
    pub truncated: Option<String>,
    /// The file is a single picture (format name for logs).
    pub still_image: Option<&'static str>,
    /// Picture size claimed by a header we can read without a demuxer.
    pub claimed_dims: Option<(u32, u32)>,
}

/// Upper bound on top-level ISO BMFF boxes we walk (fragmented MP4 has two
/// per fragment, so this covers many hours at 1 s fragments).
const MAX_BOXES: usize = 100_000;

pub(crate) fn sniff(path: &Path, len: u64) -> io::Result<Findings> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 64];
    let n = read_up_to(&mut f, &mut head)?;
    let head = &head[..n];
    let mut out = Findings::default();

    if let Some(dims) = y4m_dimensions(head) {
        out.claimed_dims = Some(dims);
    } else if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"AVI " {
        let riff = u64::from(u32::from_le_bytes(head[4..8].try_into().unwrap()));
        // 0 is what some writers leave when they never finish the file.
        if riff > 0 && riff + 8 > len {
            out.truncated = Some(format!(
                "AVI RIFF header declares {} bytes, file has {len}",
                riff + 8
            ));
        }
    } else if head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        out.truncated = matroska_truncated(&mut f, len)?;
    } else if head.len() >= 8 && is_iso_box_type(&head[4..8]) {
        iso_bmff(&mut f, len, &mut out)?;
    }
    Ok(out)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `YUV4MPEG2 W30000 H30000 F25:1 …` → (30000, 30000).
pub(crate) fn y4m_dimensions(head: &[u8]) -> Option<(u32, u32)> {
    let rest = head.strip_prefix(b"YUV4MPEG2 ")?;
    let line = rest.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let (mut w, mut h) = (None, None);
    for tok in line.split(' ') {
        // Overflowing numbers are "enormous", not "unknown".
        let num = |s: &str| {
            s.parse::<u64>()
                .ok()
                .map(|v| v.min(u64::from(u32::MAX)) as u32)
                .or_else(|| {
                    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(u32::MAX)
                })
        };
        if let Some(v) = tok.strip_prefix('W') {
            w = num(v);
        } else if let Some(v) = tok.strip_prefix('H') {
            h = num(v);
        }
    }
    Some((w?, h?))
}

/// First-box types that mark a file as ISO BMFF (MP4/MOV/3GP/HEIF).
fn is_iso_box_type(t: &[u8]) -> bool {
    matches!(
        t,
        b"ftyp" | b"moov" | b"mdat" | b"free" | b"skip" | b"wide" | b"pnot" | b"styp"
    )
}

/// Top-level ISO BMFF / QuickTime boxes a real writer produces; only these
/// count as evidence of truncation when they run past the end of the file.
fn is_known_top_level(t: &[u8; 4]) -> bool {
    is_iso_box_type(t)
        || matches!(
            t,
            b"moof"
                | b"mfra"
                | b"sidx"
                | b"ssix"
                | b"uuid"
                | b"meta"
                | b"udta"
                | b"pdin"
                | b"prft"
                | b"emsg"
                | b"junk"
        )
}

/// Walk the top-level boxes: a box that runs past the end of the file is the
/// signature of an interrupted upload; a file with media data but no `moov`
/// index was never finished (cut off before the index a camera or ffmpeg
/// writes last). HEIF/AVIF photos (`meta` but no `moov`) are still images.
fn iso_bmff(f: &mut File, len: u64, out: &mut Findings) -> io::Result<()> {
    let (mut pos, mut moov, mut moof, mut meta, mut mdat) = (0u64, false, false, false, false);
    let mut walked_to_end = false;
    for _ in 0..MAX_BOXES {
        if pos >= len || len - pos < 8 {
            walked_to_end = true;
            break;
        }
        f.seek(SeekFrom::Start(pos))?;
        let mut hdr = [0u8; 16];
        let got = read_up_to(f, &mut hdr)?;
        let size32 = u64::from(u32::from_be_bytes(hdr[0..4].try_into().unwrap()));
        let kind: [u8; 4] = hdr[4..8].try_into().unwrap();
        if !kind.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            // Not a box header: damaged, not truncated; FFmpeg decides.
            return Ok(());
        }
        let (size, hdr_len) = match size32 {
            0 => (len - pos, 8),
            1 if got >= 16 => (u64::from_be_bytes(hdr[8..16].try_into().unwrap()), 16),
            1 => {
                out.truncated = Some(format!("box header at {pos} cut off"));
                return Ok(());
            }
            n => (n, 8),
        };
        if size < hdr_len {
            return Ok(());
        }
        match &kind {
            b"moov" => moov = true,
            b"moof" => moof = true,
            b"meta" => meta = true,
            b"mdat" => mdat = true,
            _ => {}
        }
        if size > len - pos {
            if !is_known_top_level(&kind) {
                // Trailing junk that happens to look like a box header:
                // not evidence of a cut.
                return Ok(());
            }
            out.truncated = Some(format!(
                "'{}' box at offset {pos} declares {size} bytes but only {} remain",
                String::from_utf8_lossy(&kind),
                len - pos
            ));
            return Ok(());
        }
        pos += size;
    }
    if walked_to_end && !moov && !moof {
        if meta {
            out.still_image = Some("heif");
        } else if mdat {
            out.truncated = Some("media data but no 'moov' index".to_string());
        }
    }
    Ok(())
}

/// EBML variable-length integer at the reader's position: (value, length,
/// value-is-"unknown").
fn read_vint(f: &mut File, strip_marker: bool) -> io::Result<Option<(u64, bool)>> {
    let mut first = [0u8; 1];
    if read_up_to(f, &mut first)? == 0 || first[0] == 0 {
        return Ok(None);
    }
    let extra = first[0].leading_zeros() as usize;
    let mut rest = [0u8; 7];
    if read_up_to(f, &mut rest[..extra])? < extra {
        return Ok(None);
    }
    // Value bits of the first byte (none for an 8-byte vint).
    let value_bits = 0xFFu8.checked_shr(extra as u32 + 1).unwrap_or(0);
    let mask = if strip_marker { value_bits } else { 0xFF };
    let mut v = u64::from(first[0] & mask);
    let mut all_ones = first[0] & value_bits == value_bits;
    for b in &rest[..extra] {
        v = (v << 8) | u64::from(*b);
        all_ones &= *b == 0xFF;
    }
    Ok(Some((v, all_ones)))
}

/// A Matroska/WebM file whose Segment declares more bytes than the file has.
/// Live writers (browser MediaRecorder) use an "unknown" size, which tells us
/// nothing; then we say nothing.
fn matroska_truncated(f: &mut File, len: u64) -> io::Result<Option<String>> {
    f.seek(SeekFrom::Start(4))?;
    let Some((ebml_size, unknown)) = read_vint(f, true)? else {
        return Ok(None);
    };
    if unknown {
        return Ok(None);
    }
    let pos = f.stream_position()?;
    let Some(seg_at) = pos.checked_add(ebml_size).filter(|p| *p < len) else {
        return Ok(Some("file ends inside the EBML header".to_string()));
    };
    f.seek(SeekFrom::Start(seg_at))?;
    let Some((id, _)) = read_vint(f, false)? else {
        return Ok(Some("file ends before the Segment".to_string()));
    };
    if id != 0x1853_8067 {
        return Ok(None);
    }
    let Some((seg_size, unknown)) = read_vint(f, true)? else {
        return Ok(Some("file ends inside the Segment header".to_string()));
    };
    if unknown {
        return Ok(None);
    }
    let data_start = f.stream_position()?;
    if data_start.saturating_add(seg_size) > len {
        return Ok(Some(format!(
            "Matroska Segment declares {seg_size} bytes from offset {data_start}, file has {len}"
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y4m_header() {
        assert_eq!(
            y4m_dimensions(b"YUV4MPEG2 W30000 H30000 F25:1 C420jpeg\nFRAME\n"),
            Some((30000, 30000))
        );
        assert_eq!(
            y4m_dimensions(b"YUV4MPEG2 W99999999999 H2 F25:1\n"),
            Some((u32::MAX, 2))
        );
        assert_eq!(y4m_dimensions(b"YUV4MPEG2 F25:1\n"), None);
        assert_eq!(y4m_dimensions(b"RIFF...."), None);
    }

    fn sniff_bytes(bytes: &[u8]) -> Findings {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, bytes).unwrap();
        sniff(&p, bytes.len() as u64).unwrap()
    }

    fn mp4_box(kind: &[u8; 4], size: u32, body: usize) -> Vec<u8> {
        let mut v = size.to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.resize(8 + body, 0);
        v
    }

    #[test]
    fn iso_bmff_truncation() {
        let mut ok = mp4_box(b"ftyp", 16, 8);
        ok.extend(mp4_box(b"moov", 16, 8));
        ok.extend(mp4_box(b"mdat", 40, 32));
        assert_eq!(sniff_bytes(&ok), Findings::default());
        // Cut in the middle of mdat.
        assert!(sniff_bytes(&ok[..ok.len() - 5]).truncated.is_some());
        // Junk after the last box that happens to parse as a huge box.
        let mut junk = ok.clone();
        junk.extend(b"\xff\xff\xff\xffJUNKjunk");
        assert_eq!(sniff_bytes(&junk), Findings::default());
        // mdat, no moov: never finalised.
        let mut no_moov = mp4_box(b"ftyp", 16, 8);
        no_moov.extend(mp4_box(b"mdat", 40, 32));
        assert!(sniff_bytes(&no_moov).truncated.is_some());
        // HEIF photo.
        let mut heif = mp4_box(b"ftyp", 16, 8);
        heif.extend(mp4_box(b"meta", 16, 8));
        heif.extend(mp4_box(b"mdat", 16, 8));
        assert_eq!(sniff_bytes(&heif).still_image, Some("heif"));
    }

    #[test]
    fn riff_and_ebml() {
        let mut avi = b"RIFF".to_vec();
        avi.extend(1000u32.to_le_bytes());
        avi.extend(b"AVI LIST");
        avi.resize(200, 0);
        assert!(sniff_bytes(&avi).truncated.is_some());
        avi.resize(1008, 0);
        assert!(sniff_bytes(&avi).truncated.is_none());

        // EBML header (size 0), Segment of 16 bytes.
        let mut mkv = vec![0x1A, 0x45, 0xDF, 0xA3, 0x80, 0x18, 0x53, 0x80, 0x67, 0x90];
        mkv.resize(mkv.len() + 16, 0);
        assert!(sniff_bytes(&mkv).truncated.is_none());
        assert!(sniff_bytes(&mkv[..mkv.len() - 1]).truncated.is_some());
        // 8-byte sizes (what ffmpeg writes for the Segment).
        let mut big = vec![0x1A, 0x45, 0xDF, 0xA3, 0x80, 0x18, 0x53, 0x80, 0x67, 0x01];
        big.extend(16u64.to_be_bytes()[1..].iter());
        big.resize(big.len() + 16, 0);
        assert!(sniff_bytes(&big).truncated.is_none());
        assert!(sniff_bytes(&big[..big.len() - 1]).truncated.is_some());
        // Unknown-size segment (live recording): no opinion.
        let live = [
            0x1A, 0x45, 0xDF, 0xA3, 0x80, 0x18, 0x53, 0x80, 0x67, 0xFF, 0,
        ];
        assert!(sniff_bytes(&live).truncated.is_none());
    }
}
