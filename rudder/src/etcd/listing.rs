//! Listing a key prefix page by page, all pages at one revision.
//!
//! One unpaged range of `<prefix>/subnets/` grows with the cluster and hits the gRPC decode
//! limit (tonic's 4 MiB default is about 30k leases). Pages of [`PAGE_SIZE`] keys, each
//! continuing after the previous page's last key, are read at the first page's revision, so
//! the listing is one consistent snapshot and a watch from `revision + 1` misses nothing.

use etcd_client::{Client, GetOptions, KeyValue};

/// Keys per page: ~100 KiB of real leases, far below the decode limit.
pub const PAGE_SIZE: i64 = 1000;

/// Largest page answer we decode. A page of [`PAGE_SIZE`] real leases is ~100 KiB; if junk
/// values make one larger, the page is read again at half the size instead.
pub const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// The pages of one prefix listing. [`Pages::next`] until it gives `None`; then
/// [`Pages::revision`] is the revision every page was read at.
pub struct Pages {
    client: Client,
    /// The next page starts at this key.
    next_key: Vec<u8>,
    range_end: Vec<u8>,
    revision: Option<i64>,
    page_size: i64,
    max_page_bytes: usize,
    done: bool,
}

impl Pages {
    pub fn new(client: Client, prefix: &str) -> Self {
        Pages::with_limits(client, prefix, PAGE_SIZE, MAX_PAGE_BYTES)
    }

    /// As [`Pages::new`], with another page size and decode limit (tests).
    pub fn with_limits(
        client: Client,
        prefix: &str,
        page_size: i64,
        max_page_bytes: usize,
    ) -> Self {
        Pages {
            client,
            next_key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            revision: None,
            page_size: page_size.max(1),
            max_page_bytes,
            done: false,
        }
    }

    /// The revision of the listing (known after the first page).
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// The next page of keys, in key order; `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<Vec<KeyValue>>, etcd_client::Error> {
        if self.done {
            return Ok(None);
        }
        let mut resp = loop {
            let opts = GetOptions::new()
                .with_range(self.range_end.clone())
                .with_limit(self.page_size)
                // Later pages at the first page's revision: one snapshot (0 = newest).
                .with_revision(self.revision.unwrap_or(0));
            let result = self
                .client
                .kv_client()
                .max_decoding_message_size(self.max_page_bytes)
                .get(self.next_key.clone(), Some(opts))
                .await;
            match result {
                Err(etcd_client::Error::GRpcStatus(status))
                    if status.code() == tonic::Code::OutOfRange && self.page_size > 1 =>
                {
                    // The answer was over the decode limit (huge values): smaller pages.
                    self.page_size = (self.page_size / 2).max(1);
                    tracing::warn!(
                        page_size = self.page_size,
                        "an etcd listing page was over {} bytes; reading smaller pages",
                        self.max_page_bytes
                    );
                }
                other => break other?,
            }
        };
        if self.revision.is_none() {
            self.revision = Some(resp.header().map(|h| h.revision()).unwrap_or(0));
        }
        let kvs = resp.take_kvs();
        match kvs.last() {
            Some(last) if resp.more() => {
                // The smallest key after `last`.
                self.next_key = last.key().to_vec();
                self.next_key.push(0);
            }
            _ => self.done = true,
        }
        Ok(Some(kvs))
    }
}

/// Every key under `prefix` and the revision they were read at.
pub async fn list_prefix(
    client: Client,
    prefix: &str,
) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    let mut pages = Pages::new(client, prefix);
    let mut all = Vec::new();
    while let Some(page) = pages.next().await? {
        all.extend(page);
    }
    Ok((all, pages.revision().unwrap_or(0)))
}

/// The end of the key range holding every key that starts with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented; all keys if there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/net/subnets/"), b"/net/subnets0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
