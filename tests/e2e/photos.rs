//! Photos end to end: upload on a media stream, send, delivery to the
//! members, download by those it was sent to only (members, and former
//! members for what came before their leaving), refusals that leave
//! nothing behind, and the purge of uploads nobody sent.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use chat_client::{Client, ErrorCode, HistoryDirection, PhotoUpload, proto};
use chat_protocol::{Body, Frame, StreamKind};
use sha2::{Digest, Sha256};

use crate::harness::*;

/// A JPEG-looking file of `len` bytes: the format's first bytes, then a
/// pattern, so a byte out of place shows.
fn jpeg(len: usize) -> Bytes {
    let mut bytes = vec![0xff, 0xd8, 0xff, 0xe0];
    bytes.extend((0..len.saturating_sub(4)).map(|i| (i * 7 + i / 251) as u8));
    bytes.truncate(len);
    Bytes::from(bytes)
}

fn upload_of(bytes: Bytes) -> PhotoUpload {
    PhotoUpload {
        bytes,
        media_type: proto::MediaType::Jpeg,
        width: 1024,
        height: 768,
        preview: preview(),
    }
}

/// The preview every upload here carries: 1,500 bytes of JPEG.
fn preview() -> Bytes {
    jpeg(1_500)
}

/// Files under the media directory, temporary ones included, but the
/// file naming its history.
fn media_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path != dir.join(chat_server::media::HISTORY_FILE) {
                files.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

/// Writes `frames` on a new media stream of `raw`'s connection (ending
/// the client's side if `finish`) and returns the first answer.
async fn raw_media(raw: &RawControl, list: &[Frame], finish: bool) -> Body {
    let (mut send, mut recv) = raw.conn().open_bi().await.unwrap();
    let mut all = vec![Frame::open_stream(StreamKind::Media)];
    all.extend_from_slice(list);
    // The server may refuse before it has read everything: a write cut
    // short by its end of the stream is fine.
    let _ = send.write_all(&frames(&all)).await;
    if finish {
        let _ = send.finish();
    }
    let mut buf = bytes::BytesMut::new();
    next_frame(&mut recv, &mut buf)
        .await
        .body
        .expect("an answer with a body")
}

fn declared(bytes: &[u8], size: u64) -> Frame {
    Frame::new(
        1,
        Body::MediaUpload(proto::MediaUpload {
            media_type: proto::MediaType::Jpeg as i32,
            size,
            sha256: Bytes::copy_from_slice(&Sha256::digest(bytes)),
            width: 10,
            height: 10,
            preview: Bytes::new(),
        }),
    )
}

fn chunk(bytes: &[u8]) -> Frame {
    Frame::new(
        1,
        Body::MediaChunk(proto::MediaChunk {
            data: Bytes::copy_from_slice(bytes),
        }),
    )
}

fn refusal_code(body: &Body) -> ErrorCode {
    match body {
        Body::Error(e) => ErrorCode::from_wire(e.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

each_backend! {
    async fn an_unsent_photo_is_erased_and_only_its_uploader_fetches_it(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bytes = jpeg(20_000);
        let media_id = alice.upload_photo(upload_of(bytes.clone())).await.unwrap();
        let seq = alice
            .send_photo(conversation, &media_id, "not this one")
            .await
            .unwrap()
            .seq;
        assert_eq!(messages(&mut bob_events, 1).await[0].seq, seq);
        assert_eq!(bob.download_photo(&media_id).await.unwrap().1, bytes);

        let unsent = alice.unsend(conversation, seq).await.unwrap().seq;
        let got = messages(&mut bob_events, 1).await.remove(0);
        assert_eq!(
            (got.seq, got.r#type(), got.reply_to_seq),
            (unsent, proto::MessageType::Unsend, seq)
        );
        // Bob may no longer fetch it; Alice, who uploaded it, still may
        // until the purge takes it.
        assert_eq!(code(bob.download_photo(&media_id).await), ErrorCode::NotFound);
        assert_eq!(alice.download_photo(&media_id).await.unwrap().1, bytes);
        let erased = bob.message(conversation, seq).await.unwrap().unwrap();
        assert_eq!(
            (erased.r#type(), erased.text.as_str(), erased.photo.is_none(), erased.unsent),
            (proto::MessageType::Photo, "", true, true)
        );
    }

    async fn a_photo_reaches_the_conversation_and_only_its_members_fetch_it(backend: Backend) {
        let mut server = TestServer::start_on(backend).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let (carol, _carol_events) = register(server.client_config(), &name("carol")).await;
        let conversation = befriend(&alice, &bob).await;
        befriend(&alice, &carol).await;

        // Several chunks' worth, not a multiple of the chunk size.
        let bytes = jpeg(300_001);
        let media_id = alice.upload_photo(upload_of(bytes.clone())).await.unwrap();
        assert!(chat_protocol::media::is_media_id(&media_id), "{media_id}");
        // Its uploader may fetch it before sending it; nobody else may.
        let (_, own) = alice.download_photo(&media_id).await.unwrap();
        assert_eq!(own, bytes);
        assert_eq!(code(bob.download_photo(&media_id).await), ErrorCode::NotFound);

        let ack = alice.send_photo(conversation, &media_id, "the view").await.unwrap();
        let got = messages(&mut bob_events, 1).await.remove(0);
        assert_eq!(got.seq, ack.seq);
        assert_eq!(got.r#type, proto::MessageType::Photo as i32);
        assert_eq!(got.text, "the view");
        let photo = got.photo.expect("a photo message carries its photo");
        assert_eq!(photo.media_id, media_id);
        assert_eq!(photo.size, bytes.len() as u64);
        assert_eq!((photo.width, photo.height), (1024, 768));
        assert_eq!(photo.media_type, proto::MediaType::Jpeg as i32);
        assert_eq!(&photo.sha256[..], &Sha256::digest(&bytes)[..]);
        // The app's preview comes with the message, to show before the
        // download; the download's header leaves it out.
        assert_eq!(photo.preview, preview());

        let (header, fetched) = bob.download_photo(&media_id).await.unwrap();
        assert_eq!(fetched, bytes);
        assert_eq!(
            header,
            proto::Photo {
                preview: Bytes::new(),
                ..(*photo).clone()
            }
        );
        // Carol is Alice's friend but not in this conversation.
        assert_eq!(code(carol.download_photo(&media_id).await), ErrorCode::NotFound);
        assert_eq!(
            code(carol.download_photo("00000000000000000000000000000000").await),
            ErrorCode::NotFound
        );

        // Bound to its conversation: not sendable elsewhere, nor by others.
        let elsewhere = alice.open_direct(carol.identity().user_id).await.unwrap().conversation_id;
        assert_eq!(
            code(alice.send_photo(elsewhere, &media_id, "").await),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(bob.send_photo(conversation, &media_id, "").await),
            ErrorCode::NotFound
        );
        // Caption optional; a text still needs words.
        let second = alice.upload_photo(upload_of(jpeg(5_000))).await.unwrap();
        alice.send_photo(conversation, &second, "").await.unwrap();
        assert_eq!(code(alice.send_text(conversation, " ").await), ErrorCode::EmptyMessage);

        // History carries the photo, and it is all still there after a
        // restart.
        server.restart().await;
        reconnected(&bob).await;
        let page = bob
            .history(conversation, HistoryDirection::Backward, 0, 10)
            .await
            .unwrap();
        let first = page.messages.iter().find(|m| m.seq == ack.seq).unwrap();
        assert_eq!(first.photo.as_ref(), Some(&photo));
        let (_, again) = bob.download_photo(&media_id).await.unwrap();
        assert_eq!(again, bytes);
        let scraped = scrape(server.server.as_ref().unwrap().metrics_addr()).await;
        assert!(value(&scraped, "chat_photos_fetched_total") >= 1.0, "{scraped:?}");
    }

    async fn uploads_that_break_their_declaration_are_refused_and_leave_nothing(backend: Backend) {
        let server = TestServer::start_on_with(backend, |c| {
            c.limits.max_photo_bytes = 100_000;
        })
        .await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let mut raw = RawControl::resume(&server, &alice.identity().token).await;
        let media_dir = server.config.media_dir();
        let good = jpeg(50_000);

        // Over the limit: refused on the declaration alone, no byte sent.
        let answer = raw_media(&raw, &[declared(&good, 100_001)], false).await;
        assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        // The client library refuses it too, without asking.
        assert_eq!(
            code(alice.upload_photo(upload_of(jpeg(100_001))).await),
            ErrorCode::MediaRejected
        );
        // Bytes that do not hash to what was declared.
        let mut other = good.to_vec();
        other[40_000] ^= 1;
        let answer = raw_media(
            &raw,
            &[declared(&good, 50_000), chunk(&other[..30_000]), chunk(&other[30_000..])],
            true,
        )
        .await;
        assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        // Not the declared format (a PNG declared as JPEG).
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let answer = raw_media(&raw, &[declared(png, png.len() as u64), chunk(png)], true).await;
        assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        // More bytes than declared: refused as they come, without waiting
        // for the end of the stream (which never comes here).
        let answer = raw_media(
            &raw,
            &[declared(&good, 40_000), chunk(&good[..30_000]), chunk(&good[30_000..])],
            false,
        )
        .await;
        assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        // Fewer.
        let answer = raw_media(&raw, &[declared(&good, 50_000), chunk(&good[..49_999])], true).await;
        assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        // Bad declarations and frames.
        let mut no_hash = declared(&good, 50_000);
        if let Some(Body::MediaUpload(u)) = &mut no_hash.body {
            u.sha256 = Bytes::from_static(b"short");
        }
        assert_eq!(
            refusal_code(&raw_media(&raw, &[no_hash], false).await),
            ErrorCode::InvalidArgument
        );
        let answer = raw_media(&raw, &[declared(&good, 50_000), chunk(&[])], true).await;
        assert_eq!(refusal_code(&answer), ErrorCode::InvalidArgument);
        let stray = Frame::new(1, Body::ListFriends(proto::ListFriends {}));
        assert_eq!(
            refusal_code(&raw_media(&raw, &[stray], true).await),
            ErrorCode::UnexpectedFrame
        );
        let bad_fetch = Frame::new(
            1,
            Body::MediaFetch(proto::MediaFetch {
                media_id: "../../etc/passwd".into(),
                offset: 0,
            }),
        );
        assert_eq!(
            refusal_code(&raw_media(&raw, &[bad_fetch], true).await),
            ErrorCode::InvalidArgument
        );

        // Nothing of them is kept, and everything else carries on.
        wait_until("no file left of the refused uploads", || async {
            media_files(&media_dir).is_empty()
        })
        .await;
        raw.assert_served().await;
        alice.send_text(conversation, "still here").await.unwrap();
        assert_eq!(messages(&mut bob_events, 1).await[0].text, "still here");

        // An upload that does everything right, by hand: stored, one file.
        let answer = raw_media(
            &raw,
            &[declared(&good, 50_000), chunk(&good[..1]), chunk(&good[1..])],
            true,
        )
        .await;
        let Body::MediaUploaded(uploaded) = answer else {
            panic!("expected MediaUploaded, got {answer:?}");
        };
        assert_eq!(media_files(&media_dir), vec![uploaded.media_id.clone()]);
        // Fetched from an offset (a resumed download).
        let fetch = Frame::new(
            1,
            Body::MediaFetch(proto::MediaFetch {
                media_id: uploaded.media_id.clone(),
                offset: 49_000,
            }),
        );
        let (mut send, mut recv) = raw.conn().open_bi().await.unwrap();
        send.write_all(&frames(&[Frame::open_stream(StreamKind::Media), fetch]))
            .await
            .unwrap();
        send.finish().unwrap();
        let mut buf = bytes::BytesMut::new();
        let Some(Body::MediaHeader(header)) = next_frame(&mut recv, &mut buf).await.body else {
            panic!("expected a header");
        };
        assert_eq!(header.offset, 49_000);
        let mut rest = Vec::new();
        while rest.len() < 1_000 {
            match next_frame(&mut recv, &mut buf).await.body {
                Some(Body::MediaChunk(c)) => rest.extend_from_slice(&c.data),
                other => panic!("expected photo bytes, got {other:?}"),
            }
        }
        assert_eq!(&rest[..], &good[49_000..]);
        let past = Frame::new(
            1,
            Body::MediaFetch(proto::MediaFetch {
                media_id: uploaded.media_id,
                offset: 50_001,
            }),
        );
        assert_eq!(
            refusal_code(&raw_media(&raw, &[past], true).await),
            ErrorCode::InvalidArgument
        );
        raw.assert_served().await;
        let scraped = scrape(server.server.as_ref().unwrap().metrics_addr()).await;
        assert_eq!(value(&scraped, "chat_photos_uploaded_total"), 1.0);
        assert!(
            value(&scraped, "chat_errors_total{code=\"MEDIA_REJECTED\"}") >= 5.0,
            "{scraped:?}"
        );
    }

    async fn a_member_removed_while_offline_fetches_the_photos_caught_up(backend: Backend) {
        // Bob is offline while a photo is sent and he is removed: catch-up
        // brings him both, and the photo is his to download; the one sent
        // after his removal is not.
        let server = TestServer::start_on(backend).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let bob_id = bob.identity().user_id;
        let group = alice.create_group("trip", &[bob_id]).await.unwrap().conversation_id;
        messages(&mut bob_events, 1).await;
        wait_delivered(&alice, group, bob_id, 1).await;
        let token = bob.identity().token;
        bob.close();
        drop(bob_events);

        let missed = alice.upload_photo(upload_of(jpeg(4_000))).await.unwrap();
        alice.send_photo(group, &missed, "while you were out").await.unwrap();
        alice.remove_member(group, bob_id).await.unwrap();
        let after = alice.upload_photo(upload_of(jpeg(5_000))).await.unwrap();
        alice.send_photo(group, &after, "after").await.unwrap();

        let (bob, mut bob_events) = Client::resume(server.client_config(), &token).await.unwrap();
        let got = messages(&mut bob_events, 2).await;
        let photo = got[0].photo.as_ref().expect("the photo he missed");
        assert_eq!(photo.media_id, missed);
        assert!(got[1].text.contains("removed"), "{}", got[1].text);
        assert_eq!(bob.download_photo(&missed).await.unwrap().1, jpeg(4_000));
        assert_eq!(code(bob.download_photo(&after).await), ErrorCode::NotFound);
    }

    async fn a_preview_is_a_small_image_and_shares_the_caption_limit(backend: Backend) {
        let server = TestServer::start_on_with(backend, |c| c.limits.max_text_len = 2_000).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let raw = RawControl::resume(&server, &alice.identity().token).await;
        let good = jpeg(3_000);
        let with_preview = |preview: Bytes| {
            let mut frame = declared(&good, 3_000);
            if let Some(Body::MediaUpload(upload)) = &mut frame.body {
                upload.preview = preview;
            }
            frame
        };

        // Longer than the text limit (2,000 bytes here), or not an image:
        // refused on the declaration, before any byte of the photo.
        for preview in [jpeg(2_001), Bytes::from_static(b"GIF89a\x01\0\x01\0\0\0 not ours")] {
            let answer = raw_media(&raw, &[with_preview(preview)], false).await;
            assert_eq!(refusal_code(&answer), ErrorCode::MediaRejected);
        }
        // The client library refuses the same without asking.
        let oversized = PhotoUpload {
            preview: jpeg(2_001),
            ..upload_of(good.clone())
        };
        assert_eq!(code(alice.upload_photo(oversized).await), ErrorCode::MediaRejected);

        // The caption and the preview share the text limit, so the message
        // fits in a frame: 1,500 bytes of preview leave 500 for words.
        let media_id = alice.upload_photo(upload_of(good.clone())).await.unwrap();
        assert_eq!(
            code(alice.send_photo(conversation, &media_id, &"x".repeat(501)).await),
            ErrorCode::MessageTooLarge
        );
        let ack = alice
            .send_photo(conversation, &media_id, &"x".repeat(500))
            .await
            .unwrap();
        let got = messages(&mut bob_events, 1).await.remove(0);
        assert_eq!(got.seq, ack.seq);
        assert_eq!(got.photo.expect("a photo").preview, preview());
        // History has it; the conversation list, a line per conversation,
        // does not.
        let page = bob
            .history(conversation, HistoryDirection::Backward, 0, 10)
            .await
            .unwrap();
        let stored = page.messages.iter().find(|m| m.seq == ack.seq).unwrap();
        assert_eq!(stored.photo.as_ref().unwrap().preview, preview());
        let listed = bob.conversations(10, None).await.unwrap();
        let entry = listed
            .iter()
            .find(|c| c.conversation_id == conversation)
            .and_then(|c| c.last_message.as_ref())
            .expect("the conversation is listed with its last message");
        let photo = entry.photo.as_ref().expect("the last message is the photo");
        assert_eq!((&photo.media_id, photo.preview.len()), (&media_id, 0));
        // Only the one upload was kept.
        assert_eq!(media_files(&server.config.media_dir()), vec![media_id]);
    }

    async fn uploads_nobody_sent_are_purged_after_the_retention(backend: Backend) {
        let server = TestServer::start_on_with(backend, |c| {
            // Long enough that the sent photo is bound well within it, on
            // a busy machine too.
            c.limits.upload_retention = Duration::from_secs(4);
            c.limits.uploads_per_hour = 2;
            c.limits.session_purge_interval = Duration::from_millis(100);
        })
        .await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let media_dir = server.config.media_dir();
        let sent = alice.upload_photo(upload_of(jpeg(2_000))).await.unwrap();
        alice.send_photo(conversation, &sent, "kept").await.unwrap();
        let unsent = alice.upload_photo(upload_of(jpeg(3_000))).await.unwrap();
        // Two an hour.
        let third = alice.upload_photo(upload_of(jpeg(1_000))).await.unwrap_err();
        assert_eq!(third.code(), Some(ErrorCode::RateLimited));
        assert!(
            matches!(&third, chat_client::ClientError::Server { retry_after: Some(_), .. }),
            "{third:?}"
        );
        wait_until("the unsent upload's file is deleted", || async {
            !media_files(&media_dir).contains(&unsent)
        })
        .await;
        assert_eq!(media_files(&media_dir), vec![sent.clone()]);
        assert_eq!(code(alice.send_photo(conversation, &unsent, "").await), ErrorCode::NotFound);
        assert_eq!(code(alice.download_photo(&unsent).await), ErrorCode::NotFound);
        let (_, kept) = bob.download_photo(&sent).await.unwrap();
        assert_eq!(kept, jpeg(2_000));
        let scraped = scrape(server.server.as_ref().unwrap().metrics_addr()).await;
        assert_eq!(value(&scraped, "chat_photos_purged_total"), 1.0);
    }

    async fn photo_files_without_a_row_are_swept(backend: Backend) {
        // A round every 10 ms: the sweep visits all 256 subdirectories in
        // a few seconds.
        let server = TestServer::start_on_with(backend, |c| {
            c.limits.session_purge_interval = Duration::from_millis(10);
        })
        .await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let media_dir = server.config.media_dir();
        let path = |id: &str| media_dir.join(&id[..2]).join(id);
        let written_long_ago = |id: &str| {
            let file = std::fs::File::options().write(true).open(path(id)).unwrap();
            file.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
                .unwrap();
        };
        // A sent photo, its file written long ago: it has its row.
        let sent = alice.upload_photo(upload_of(jpeg(2_000))).await.unwrap();
        alice.send_photo(conversation, &sent, "kept").await.unwrap();
        written_long_ago(&sent);
        // Files with no row, as a stop between a file and its row leaves
        // them: an old one, and one written just now (its row may be
        // about to come), in the same subdirectory, so one sweep looks at
        // both.
        let (old, new) = ("ab".repeat(16), format!("ab{}", "cd".repeat(15)));
        for id in [&old, &new] {
            std::fs::write(path(id), jpeg(1_000)).unwrap();
        }
        written_long_ago(&old);
        // And one beside the sent photo: once it is gone, the sent photo's
        // subdirectory was swept too.
        let beside = format!("{}{}", &sent[..2], "ef".repeat(15));
        std::fs::write(path(&beside), jpeg(1_000)).unwrap();
        written_long_ago(&beside);
        wait_until("the old files without a row are removed", || async {
            !path(&old).exists() && !path(&beside).exists()
        })
        .await;
        assert!(path(&new).exists(), "a recent file is left alone");
        assert!(path(&sent).exists());
        assert_eq!(bob.download_photo(&sent).await.unwrap().1, jpeg(2_000));
        // Counted once their subdirectories are done, a moment after.
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        scrape_until(metrics, "the files counted", |m| {
            value(m, "chat_photo_files_swept_total") == 2.0
        })
        .await;
    }

    async fn who_may_fetch_a_photo_follows_what_they_were_sent(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let (carol, mut carol_events) = register(server.client_config(), &name("carol")).await;
        befriend(&alice, &bob).await;
        let with_carol = befriend(&alice, &carol).await;
        let (bob_id, carol_id) = (bob.identity().user_id, carol.identity().user_id);

        // A member added later does not get photos from before they joined.
        let group = alice.create_group("trip", &[bob_id]).await.unwrap().conversation_id;
        let before = alice.upload_photo(upload_of(jpeg(4_000))).await.unwrap();
        alice.send_photo(group, &before, "before").await.unwrap();
        alice.add_members(group, &[carol_id]).await.unwrap();
        let after = alice.upload_photo(upload_of(jpeg(6_000))).await.unwrap();
        alice.send_photo(group, &after, "after").await.unwrap();
        let got = wait_for(&mut carol_events, "the photo sent after carol joined", |e| match e {
            chat_client::Event::Message(m) if m.photo.is_some() => Some(m),
            _ => None,
        })
        .await;
        assert_eq!(got.photo.unwrap().media_id, after);
        assert_eq!(carol.download_photo(&after).await.unwrap().1, jpeg(6_000));
        assert_eq!(code(carol.download_photo(&before).await), ErrorCode::NotFound);
        assert_eq!(bob.download_photo(&before).await.unwrap().1, jpeg(4_000));
        let bob_got = messages(&mut bob_events, 4).await;
        assert!(bob_got.iter().any(|m| m.photo.as_ref().is_some_and(|p| p.media_id == before)));

        // A send refused after its photo was bound stores nothing: the other
        // member cannot fetch it, and the uploader cannot send it elsewhere
        // (it is left to the purge).
        carol.remove_friend(alice.identity().user_id).await.unwrap();
        let refused = alice.upload_photo(upload_of(jpeg(5_000))).await.unwrap();
        assert_eq!(
            code(alice.send_photo(with_carol, &refused, "").await),
            ErrorCode::NotFriends
        );
        assert_eq!(code(carol.download_photo(&refused).await), ErrorCode::NotFound);
        assert_eq!(alice.download_photo(&refused).await.unwrap().1, jpeg(5_000));

        // Who leaves or is removed keeps the photos of what they were sent,
        // and may fetch none sent after.
        alice.remove_member(group, bob_id).await.unwrap();
        carol.leave_group(group).await.unwrap();
        let later = alice.upload_photo(upload_of(jpeg(7_000))).await.unwrap();
        alice.send_photo(group, &later, "later").await.unwrap();
        assert_eq!(bob.download_photo(&before).await.unwrap().1, jpeg(4_000));
        assert_eq!(bob.download_photo(&after).await.unwrap().1, jpeg(6_000));
        assert_eq!(carol.download_photo(&after).await.unwrap().1, jpeg(6_000));
        assert_eq!(code(carol.download_photo(&before).await), ErrorCode::NotFound);
        for former in [&bob, &carol] {
            assert_eq!(code(former.download_photo(&later).await), ErrorCode::NotFound);
        }
        // Carol, added later, who left, reads history from her addition to
        // her leaving, wherever the page starts.
        let page = carol
            .history(group, HistoryDirection::Backward, 1_000, 50)
            .await
            .unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, page.has_more), (vec![3, 4, 5, 6], false));
        let forward = carol
            .history(group, HistoryDirection::Forward, 6, 50)
            .await
            .unwrap();
        assert!(forward.messages.is_empty() && !forward.has_more, "{forward:?}");
    }

    async fn a_photo_answers_a_message_it_names(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let question = alice.send_text(conversation, "where are you?").await.unwrap().seq;
        let media_id = bob.upload_photo(upload_of(jpeg(4_000))).await.unwrap();
        // Refused before the photo is bound: the same upload answers the
        // right message next.
        assert_eq!(
            code(bob.send_photo_reply(conversation, question + 5, &media_id, "here").await),
            ErrorCode::NotFound
        );
        let ack = bob
            .send_photo_reply(conversation, question, &media_id, "here")
            .await
            .unwrap();
        let got = messages(&mut alice_events, 1).await.remove(0);
        assert_eq!(
            (got.seq, got.r#type(), got.reply_to_seq, got.text.as_str()),
            (ack.seq, proto::MessageType::Photo, question, "here")
        );
        assert_eq!(got.photo.expect("its photo").media_id, media_id);
        // What a reply quotes, read back by its seq.
        let quoted = bob.message(conversation, got.reply_to_seq).await.unwrap();
        assert_eq!(quoted.map(|m| m.text), Some("where are you?".to_owned()));
        assert_eq!(bob.message(conversation, ack.seq + 1).await.unwrap(), None);
    }
}

#[tokio::test]
async fn a_transfer_that_finds_no_stream_free_times_out() {
    // The server lets a connection open four streams: control, messages,
    // receipts and calls take them all. An upload or a download then
    // waits for a stream that never comes; it used to wait for as long as
    // the connection lived, and now times out (the app tries again).
    let server = TestServer::start_with(|c| c.transport.max_concurrent_bidi_streams = 4).await;
    let mut config = server.client_config();
    config.calls = true;
    config.request_timeout = Duration::from_secs(2);
    let (alice, _alice_events) = register(config, &name("alice")).await;
    let upload = tokio::time::timeout(WAIT, alice.upload_photo(upload_of(jpeg(5_000))))
        .await
        .expect("the upload ends");
    assert_eq!(upload.unwrap_err(), chat_client::ClientError::Timeout);
    let download = tokio::time::timeout(WAIT, alice.download_photo("m0123456789abcdef"))
        .await
        .expect("the download ends");
    assert_eq!(download.unwrap_err(), chat_client::ClientError::Timeout);
}

#[tokio::test]
async fn a_media_directory_belongs_to_one_history() {
    let shared = tempfile::tempdir().unwrap();
    let media = shared.path().join("media");
    let dir = media.clone();
    let first = TestServer::start_with(move |c| c.media_dir = Some(dir)).await;
    drop(first);
    // Another history (a data directory of its own) on the same media
    // directory: its sweep would take the first one's photos for
    // leftovers, so it does not start.
    let other = tempfile::tempdir().unwrap();
    let mut config = chat_server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: other.path().to_path_buf(),
        media_dir: Some(media.clone()),
        ..chat_server::Config::default()
    };
    config.limits.registrations_per_address = 0;
    let refused = match chat_server::Server::start(config).await {
        Ok(_) => panic!("started on another history's media directory"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("another history"), "{refused}");
}
