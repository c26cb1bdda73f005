//! Photo bytes on disk. One file per upload under the media directory,
//! named by its media id (`<dir>/<first two digits>/<id>`, so no directory
//! holds more than 1/256 of them). An upload is written to `<dir>/tmp`
//! first and renamed into place once complete and synced, so a file under
//! its id is always whole; history's `media` rows say who may read it.
//!
//! The calls block (a write, an `fsync`), so the async side runs each on
//! tokio's blocking pool.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chat_protocol::media::is_media_id;

/// How long a temporary upload file may go unwritten before a node's start
/// takes it for a leftover. Far longer than an upload may last
/// (`UPLOAD_DEADLINE` in `streams::media`).
const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(3600);

/// The file in the media directory naming the history its photos belong
/// to ([`MediaFiles::claim`]).
pub const HISTORY_FILE: &str = "history";

/// The media directory.
#[derive(Debug)]
pub struct MediaFiles {
    dir: PathBuf,
}

/// A subdirectory being listed ([`MediaFiles::list`]).
pub struct Listing {
    entries: Option<std::fs::ReadDir>,
}

impl Listing {
    /// Up to `n` more media ids; none at the end. Names that are not
    /// media ids are skipped, and so are entries removed meanwhile.
    pub async fn next(&mut self, n: usize) -> std::io::Result<Vec<String>> {
        let Some(mut entries) = self.entries.take() else {
            return Ok(Vec::new());
        };
        let (entries, ids) = blocking(move || {
            let mut ids = Vec::with_capacity(n);
            while ids.len() < n {
                match entries.next() {
                    None => return Ok((None, ids)),
                    Some(Err(_)) => continue,
                    Some(Ok(entry)) => {
                        if let Some(id) = entry.file_name().to_str().filter(|id| is_media_id(id)) {
                            ids.push(id.to_string());
                        }
                    }
                }
            }
            Ok((Some(entries), ids))
        })
        .await?;
        self.entries = entries;
        Ok(ids)
    }
}

/// A file being uploaded; removed when dropped unless it was stored.
pub struct Upload {
    file: Option<File>,
    path: PathBuf,
}

impl MediaFiles {
    /// Opens the directory, creating it with its 256 subdirectories (made
    /// durable here, so that storing a photo needs only its own rename
    /// synced), and removes what uploads cut short by a stop left in `tmp`
    /// (those untouched for [`STALE_UPLOAD`]: nodes sharing the directory
    /// may be writing the others).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut created = false;
        for prefix in 0..=255u8 {
            let sub = dir.join(format!("{prefix:02x}"));
            if !sub.is_dir() {
                std::fs::create_dir(&sub)?;
                created = true;
            }
        }
        if created {
            File::open(dir)?.sync_all()?;
        }
        let now = std::time::SystemTime::now();
        for entry in std::fs::read_dir(&tmp)? {
            // Another node sharing the directory may finish (rename) or
            // drop an upload meanwhile: an entry that is gone is skipped.
            let Ok(modified) = entry.and_then(|e| e.metadata()?.modified().map(|m| (e, m))) else {
                continue;
            };
            let (entry, modified) = modified;
            if now.duration_since(modified).unwrap_or_default() < STALE_UPLOAD {
                continue;
            }
            let path = entry.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an unfinished upload");
            }
        }
        Ok(MediaFiles {
            dir: dir.to_path_buf(),
        })
    }

    /// Pairs the directory with the history `history_id`, the first time
    /// by writing it into [`HISTORY_FILE`] (durably: written aside, synced,
    /// linked into place unless another start did first). Returns the other history's id if the directory is
    /// another's: its photos are not this history's, whose sweep would
    /// take them for leftovers. Nodes sharing a history share its
    /// directory and write the same id.
    pub async fn claim(&self, history_id: &str) -> std::io::Result<Option<String>> {
        let dir = self.dir.clone();
        let id = history_id.to_string();
        blocking(move || {
            let file = dir.join(HISTORY_FILE);
            match std::fs::read_to_string(&file) {
                Ok(held) if held.trim() == id => return Ok(None),
                Ok(held) => return Ok(Some(held.trim().to_string())),
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            let aside = dir
                .join("tmp")
                .join(format!("history-{:032x}", rand::random::<u128>()));
            let mut out = File::create_new(&aside)?;
            out.write_all(format!("{id}\n").as_bytes())?;
            out.sync_all()?;
            drop(out);
            // A link, not a rename: it fails if another node's start wrote
            // the file first, whose id is then the one that counts.
            let linked = std::fs::hard_link(&aside, &file);
            let _ = std::fs::remove_file(&aside);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = std::fs::read_to_string(&file)?;
                    let held = held.trim();
                    return Ok((held != id).then(|| held.to_string()));
                }
                Err(e) => return Err(e),
            }
            File::open(&dir)?.sync_all()?;
            Ok(None)
        })
        .await
    }

    /// Where the photo `media_id` is kept. The id must be a media id: it
    /// becomes a file name.
    fn path(&self, media_id: &str) -> PathBuf {
        assert!(is_media_id(media_id), "not a media id: {media_id:?}");
        self.dir.join(&media_id[..2]).join(media_id)
    }

    /// Starts an upload: an empty temporary file.
    pub async fn start(&self) -> std::io::Result<Upload> {
        let path = self
            .dir
            .join("tmp")
            .join(format!("{:032x}.part", rand::random::<u128>()));
        blocking(move || {
            let file = File::create_new(&path)?;
            Ok(Upload {
                file: Some(file),
                path,
            })
        })
        .await
    }

    /// Syncs a complete upload and puts it in place under `media_id`
    /// (durable when this returns).
    pub async fn store(&self, mut upload: Upload, media_id: &str) -> std::io::Result<()> {
        let target = self.path(media_id);
        blocking(move || {
            let file = upload.file.take().expect("an upload is stored once");
            file.sync_all()?;
            drop(file);
            let parent = target.parent().expect("a media path has a parent");
            std::fs::rename(&upload.path, &target)?;
            upload.kept();
            // The rename is durable once the directory is synced; if that
            // fails, the photo is not stored, and not left in place either.
            if let Err(e) = File::open(parent).and_then(|d| d.sync_all()) {
                let _ = std::fs::remove_file(&target);
                return Err(e);
            }
            Ok(())
        })
        .await
    }

    /// Opens the photo `media_id` for reading from `offset`.
    pub async fn open_at(&self, media_id: &str, offset: u64) -> std::io::Result<File> {
        let path = self.path(media_id);
        blocking(move || {
            let mut file = File::open(path)?;
            file.seek(SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await
    }

    /// Lists the photo files of subdirectory `prefix` (of 256), a few
    /// names at a time ([`Listing::next`]): the sweep for files without a
    /// row walks one so.
    pub async fn list(&self, prefix: u8) -> std::io::Result<Listing> {
        let sub = self.dir.join(format!("{prefix:02x}"));
        let entries = blocking(move || std::fs::read_dir(sub)).await?;
        Ok(Listing {
            entries: Some(entries),
        })
    }

    /// Whether the photo file `media_id` was last written before `before`
    /// (false if it is gone). A file is renamed under its id whole, after
    /// its last write, and its row is written right after: one written
    /// long ago that has no row never gets one.
    pub async fn written_before(
        &self,
        media_id: &str,
        before: std::time::SystemTime,
    ) -> std::io::Result<bool> {
        let path = self.path(media_id);
        blocking(move || match std::fs::metadata(path) {
            Ok(meta) => Ok(meta.modified()? < before),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        })
        .await
    }

    /// Deletes the photo `media_id`; one already gone is not an error.
    pub async fn remove(&self, media_id: &str) -> std::io::Result<()> {
        let path = self.path(media_id);
        blocking(move || match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }
}

impl Upload {
    /// The file is in place: nothing to remove at the drop.
    fn kept(&mut self) {
        self.path = PathBuf::new();
    }

    /// Appends bytes.
    pub async fn write(mut self, data: bytes::Bytes) -> std::io::Result<Self> {
        blocking(move || {
            self.file
                .as_mut()
                .expect("an upload being written has its file")
                .write_all(&data)?;
            Ok(self)
        })
        .await
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads up to `max` bytes from `file` (fewer only at its end).
pub async fn read_chunk(mut file: File, max: usize) -> std::io::Result<(File, bytes::Bytes)> {
    blocking(move || {
        let mut buf = Vec::with_capacity(max);
        (&mut file).take(max as u64).read_to_end(&mut buf)?;
        Ok((file, bytes::Bytes::from(buf)))
    })
    .await
}

async fn blocking<T, F>(f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "00112233445566778899aabbccddeeff";

    #[tokio::test]
    async fn a_stored_upload_reads_back_and_an_unstored_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = MediaFiles::open(dir.path()).unwrap();
        let upload = files.start().await.unwrap();
        let upload = upload
            .write(bytes::Bytes::from_static(b"hello "))
            .await
            .unwrap();
        let upload = upload
            .write(bytes::Bytes::from_static(b"photo"))
            .await
            .unwrap();
        files.store(upload, ID).await.unwrap();
        let file = files.open_at(ID, 6).await.unwrap();
        let (_, rest) = read_chunk(file, 100).await.unwrap();
        assert_eq!(&rest[..], b"photo");
        assert!(dir.path().join("00").join(ID).exists());

        // Dropped before it was stored: the temporary file goes.
        let upload = files.start().await.unwrap();
        let upload = upload
            .write(bytes::Bytes::from_static(b"cut"))
            .await
            .unwrap();
        drop(upload);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        files.remove(ID).await.unwrap();
        files.remove(ID).await.unwrap();
        assert!(files.open_at(ID, 0).await.is_err());
    }

    #[tokio::test]
    async fn a_directory_belongs_to_the_first_history_that_claims_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = MediaFiles::open(dir.path()).unwrap();
        assert_eq!(files.claim("history-a").await.unwrap(), None);
        assert_eq!(files.claim("history-a").await.unwrap(), None);
        // Another node of the same history, then another history.
        let again = MediaFiles::open(dir.path()).unwrap();
        assert_eq!(again.claim("history-a").await.unwrap(), None);
        assert_eq!(
            again.claim("history-b").await.unwrap(),
            Some("history-a".to_string())
        );
        // Nothing left aside.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn leftovers_of_a_stop_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let files = MediaFiles::open(dir.path()).unwrap();
        let old = files.start().await.unwrap();
        let recent = files.start().await.unwrap();
        // A crash: the process ends without the drops. The old file was
        // last written two hours ago; the recent one may be another node's.
        let two_hours_ago = std::time::SystemTime::now() - 2 * STALE_UPLOAD;
        old.file
            .as_ref()
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let recent_path = recent.path.clone();
        std::mem::forget((old, recent));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            2
        );
        MediaFiles::open(dir.path()).unwrap();
        let left: Vec<PathBuf> = std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, vec![recent_path]);
    }
}
