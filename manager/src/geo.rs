//! Choosing the mirror closest to a viewer.
//!
//! The client address comes from the TCP peer, or from `X-Forwarded-For`
//! only when the peer is a configured proxy (anyone can write that header).
//! It is looked up in a MaxMind-format `.mmdb` the operator provides; the
//! great-circle distance to each candidate node, divided by the node's
//! weight, ranks them. Candidates are only healthy nodes holding a verified
//! copy. An address the database does not know (private, loopback, absent)
//! or no database at all falls back to the configured order.
//!
//! The database is read fully at start and checked with sample lookups, so
//! a broken file stops the manager with a message naming `geoip_db` rather
//! than failing lookups at 3 a.m.

use std::{net::IpAddr, path::Path};

use axum::http::HeaderMap;
use ipnet::IpNet;
use serde::Deserialize;

#[derive(Deserialize)]
struct Record {
    location: Option<Location>,
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// Addresses spread over the address space; decoding their records proves
/// the data section is readable, not merely that the metadata parsed.
const PROBES: &[&str] = &[
    "1.1.1.1",
    "8.8.8.8",
    "81.2.69.142",
    "216.160.83.56",
    "89.160.20.112",
    "2001:218::1",
];

impl GeoDb {
    pub fn open(path: &Path) -> anyhow::Result<GeoDb> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let db = GeoDb { reader };
        for p in PROBES {
            let ip: IpAddr = p.parse().expect("literal address");
            db.reader.lookup::<Record>(ip).map_err(|e| {
                anyhow::anyhow!("{} is damaged or not a city database: {e}", path.display())
            })?;
        }
        Ok(db)
    }

    /// Latitude and longitude of `ip`, if the database places it.
    pub fn locate(&self, ip: IpAddr) -> Option<(f64, f64)> {
        match self.reader.lookup::<Record>(ip) {
            Ok(Some(Record {
                location:
                    Some(Location {
                        latitude: Some(lat),
                        longitude: Some(lon),
                    }),
            })) => Some((lat, lon)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(%ip, "geoip lookup failed: {e}");
                None
            }
        }
    }
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6371.0;
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

/// The viewer's address: the peer, unless the peer is a trusted proxy, in
/// which case the right-most `X-Forwarded-For` hop that is not itself a
/// trusted proxy (hops further left were written by the client and can lie).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    shared::runtime::client_ip(
        peer,
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
        trusted,
    )
}

/// A node the redirector may send a viewer to.
pub struct Candidate<'a> {
    pub name: &'a str,
    pub lat: f64,
    pub lon: f64,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Nearest,
    Fallback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Nearest => "nearest",
            Reason::Fallback => "fallback",
        }
    }
}

/// Index of the best candidate. With a location: the smallest distance per
/// unit of weight. Without: the first in the given (fallback) order, heavier
/// weight first among the rest.
pub fn choose(candidates: &[Candidate<'_>], viewer: Option<(f64, f64)>) -> Option<(usize, Reason)> {
    if candidates.is_empty() {
        return None;
    }
    match viewer {
        Some(at) => {
            let score =
                |c: &Candidate<'_>| distance_km(at, (c.lat, c.lon)) / f64::from(c.weight.max(1));
            let best = (0..candidates.len())
                .min_by(|&a, &b| score(&candidates[a]).total_cmp(&score(&candidates[b])))
                .expect("non-empty");
            Some((best, Reason::Nearest))
        }
        None => {
            let best = (0..candidates.len())
                .max_by_key(|&i| (candidates[i].weight, std::cmp::Reverse(i)))
                .expect("non-empty");
            Some((best, Reason::Fallback))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UTAH: (f64, f64) = (40.76, -111.89);
    const TORONTO: (f64, f64) = (43.65, -79.38);

    fn nodes() -> Vec<Candidate<'static>> {
        vec![
            Candidate {
                name: "utah",
                lat: UTAH.0,
                lon: UTAH.1,
                weight: 1,
            },
            Candidate {
                name: "toronto",
                lat: TORONTO.0,
                lon: TORONTO.1,
                weight: 1,
            },
        ]
    }

    /// This crate's folder, as `cargo test` gives it when the test runs. The
    /// compile-time value is only a fallback: a build folder shared by two
    /// checkouts may hand one of them a binary compiled in the other.
    fn crate_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
    }

    fn test_db(name: &str) -> std::path::PathBuf {
        crate_dir().join("../../shared/data/geoip").join(name)
    }

    #[test]
    fn distances_are_great_circle() {
        // London to New York is 5,570 km; Salt Lake City to Toronto 2,680 km.
        let d = distance_km((51.5074, -0.1278), (40.7128, -74.0060));
        assert!((5550.0..5590.0).contains(&d), "{d}");
        let d = distance_km(UTAH, TORONTO);
        assert!((2650.0..2710.0).contains(&d), "{d}");
        assert!(distance_km(UTAH, UTAH) < 1e-6);
    }

    #[test]
    fn viewers_go_to_the_nearest_node_from_the_test_database() {
        let db = GeoDb::open(&test_db("GeoIP2-City-Test.mmdb")).unwrap();
        let n = nodes();
        for (ip, want) in [
            ("216.160.83.56", "utah"),    // Milton, WA
            ("214.78.120.1", "utah"),     // San Diego
            ("175.16.199.1", "utah"),     // Changchun
            ("81.2.69.142", "toronto"),   // London
            ("89.160.20.112", "toronto"), // Linköping
        ] {
            let at = db.locate(ip.parse().unwrap());
            assert!(at.is_some(), "{ip} not in the test database");
            let (i, reason) = choose(&n, at).unwrap();
            assert_eq!((n[i].name, reason), (want, Reason::Nearest), "{ip}");
        }
        for unknown in ["127.0.0.1", "10.0.0.1"] {
            assert_eq!(db.locate(unknown.parse().unwrap()), None);
        }
        assert_eq!(choose(&n, None), Some((0, Reason::Fallback)));
    }

    #[test]
    fn weights_shift_the_choice_and_the_fallback() {
        let mut n = nodes();
        n[1].weight = 10;
        // London is nearer Toronto anyway; Milton is ~2.3x nearer Utah, but a
        // tenfold weight sends it to Toronto.
        let milton = Some((47.2513, -122.3149));
        assert_eq!(n[choose(&n, milton).unwrap().0].name, "toronto");
        assert_eq!(n[choose(&n, None).unwrap().0].name, "toronto");
        assert!(choose(&[], None).is_none());
    }

    #[test]
    fn a_broken_or_wrong_database_is_a_clear_error() {
        let e = GeoDb::open(&test_db("GeoIP2-City-Test-Broken-Double-Format.mmdb"))
            .err()
            .expect("must fail");
        assert!(e.to_string().contains("damaged"), "{e}");
        let e = GeoDb::open(Path::new("/nonexistent.mmdb"))
            .err()
            .expect("must fail");
        assert!(e.to_string().contains("cannot read"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.mmdb");
        std::fs::write(&junk, b"not a database at all").unwrap();
        assert!(GeoDb::open(&junk).is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 81.2.69.142, 10.1.2.3".parse().unwrap(),
        );
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "81.2.69.142".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
