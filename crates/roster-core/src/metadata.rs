//! Instance metadata: a small string map kept sorted by key in one packed
//! allocation, because at a million instances a map of separately allocated
//! strings was the largest part of an instance's memory. Owns the packing
//! and map semantics; must not validate entries (the model does).

use std::fmt;

/// A string-to-string map, sorted by key, packed into one `Box<str>`:
/// each entry is `<key length>:<key><value length>:<value>` with decimal
/// byte lengths. Reads walk the entries (metadata holds a handful); writes
/// rebuild the packing.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata {
    packed: Box<str>,
}

impl Metadata {
    /// An empty map (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    /// The entries, in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { rest: &self.packed }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether there is a value under `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: &str, value: &str) -> Option<String> {
        let old = self.get(key).map(str::to_owned);
        let mut entries: Vec<(&str, &str)> = self.iter().filter(|(k, _)| *k != key).collect();
        let at = entries.partition_point(|(k, _)| *k < key);
        entries.insert(at, (key, value));
        self.packed = pack(&entries);
        old
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let old = self.get(key)?.to_owned();
        let entries: Vec<(&str, &str)> = self.iter().filter(|(k, _)| *k != key).collect();
        self.packed = pack(&entries);
        Some(old)
    }
}

/// Packs entries already sorted by key with no key twice, into exactly
/// the bytes they need (no reallocation when boxed).
fn pack(entries: &[(&str, &str)]) -> Box<str> {
    let field = |s: &str| s.len().checked_ilog10().unwrap_or(0) as usize + 2 + s.len();
    let len: usize = entries.iter().map(|(k, v)| field(k) + field(v)).sum();
    let mut out = String::with_capacity(len);
    for (k, v) in entries {
        for s in [k, v] {
            push_decimal(&mut out, s.len());
            out.push(':');
            out.push_str(s);
        }
    }
    debug_assert_eq!(out.len(), len);
    out.into_boxed_str()
}

/// Appends `n` in decimal (without `fmt`: a snapshot packs millions).
fn push_decimal(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
}

/// Iterator over a [`Metadata`]'s entries, in key order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    rest: &'a str,
}

impl<'a> Iter<'a> {
    /// Splits one length-prefixed field off the front of `rest`.
    fn field(&mut self) -> Option<&'a str> {
        let colon = self.rest.find(':').filter(|c| *c > 0)?;
        // Decimal digits, as `pack` writes them.
        let len = self.rest.as_bytes()[..colon]
            .iter()
            .try_fold(0usize, |n, d| {
                let d = d.checked_sub(b'0').filter(|d| *d < 10)?;
                n.checked_mul(10)?.checked_add(usize::from(d))
            })?;
        let field = self.rest.get(colon + 1..colon + 1 + len)?;
        self.rest = &self.rest[colon + 1 + len..];
        Some(field)
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        // The packing is only ever built by `pack`, so both fields parse.
        Some((self.field()?, self.field()?))
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Metadata {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    /// The entries as owned strings, in key order.
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Metadata {
    /// Later entries win over earlier ones with the same key, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut owned: Vec<(K, V)> = iter.into_iter().collect();
        // Stable, so among equal keys the last inserted stays last.
        owned.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut entries: Vec<(&str, &str)> = Vec::with_capacity(owned.len());
        for (k, v) in &owned {
            match entries.last_mut() {
                Some(last) if last.0 == k.as_ref() => last.1 = v.as_ref(),
                _ => entries.push((k.as_ref(), v.as_ref())),
            }
        }
        Self {
            packed: pack(&entries),
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for Metadata {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        let merged: Vec<(String, String)> = self
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain(
                iter.into_iter()
                    .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
            )
            .collect();
        *self = merged.into_iter().collect();
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn keys_and_values_of_many_digits_of_length_come_back() {
        let mut m = Metadata::new();
        let long: Vec<String> = [9, 10, 99, 100, 1234]
            .iter()
            .map(|n| "x".repeat(*n))
            .collect();
        for (n, v) in long.iter().enumerate() {
            m.insert(&format!("{n}{v}"), v);
        }
        m.insert("", "");
        let got: Vec<(&str, &str)> = m.iter().collect();
        assert_eq!(got.len(), long.len() + 1);
        for (n, v) in long.iter().enumerate() {
            assert_eq!(m.get(&format!("{n}{v}")), Some(v.as_str()));
        }
        assert_eq!(m.get(""), Some(""));
    }

    #[test]
    fn behaves_as_a_sorted_map() {
        let mut m = Metadata::new();
        assert!(m.is_empty());
        assert_eq!(m.insert("zone", "a"), None);
        assert_eq!(m.insert("version", "1:2"), None);
        assert_eq!(m.insert("zone", "b"), Some("a".to_owned()));
        assert_eq!(m.get("zone"), Some("b"));
        assert_eq!(m.get("zon"), None);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [("version", "1:2"), ("zone", "b")]
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove("version"), Some("1:2".to_owned()));
        assert_eq!(m.remove("version"), None);
        assert_eq!(format!("{m:?}"), r#"{"zone": "b"}"#);
    }

    #[test]
    fn collecting_keeps_the_last_value_of_a_key() {
        let m: Metadata = [("k", "1"), ("a", ""), ("k", "2")].into_iter().collect();
        assert_eq!(m.iter().collect::<Vec<_>>(), [("a", ""), ("k", "2")]);
        let mut n = m.clone();
        n.extend([("a", "x"), ("b", "y")]);
        assert_eq!(
            n.iter().collect::<Vec<_>>(),
            [("a", "x"), ("b", "y"), ("k", "2")]
        );
    }

    proptest! {
        #[test]
        fn matches_a_btreemap(ops in proptest::collection::vec(
            (any::<bool>(), "[a-c:0-9]{0,3}", "\\PC{0,6}"), 0..24)) {
            let mut m = Metadata::new();
            let mut b = BTreeMap::new();
            for (insert, k, v) in &ops {
                if *insert {
                    prop_assert_eq!(m.insert(k, v), b.insert(k.clone(), v.clone()));
                } else {
                    prop_assert_eq!(m.remove(k), b.remove(k));
                }
            }
            let want: Vec<(&str, &str)> = b.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), want);
            prop_assert_eq!(m.len(), b.len());
            let collected: Metadata = b.iter().collect();
            prop_assert_eq!(collected, m);
        }
    }
}
