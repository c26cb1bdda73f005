//! A terminal chat client: log in (or register), manage friends, open a
//! conversation and chat, with ✓ (sent), ✓✓ (delivered) and "seen" marks.
//!
//! ```text
//! cargo run -p chat-client --example chat -- --ca data/certs/ca.pem --user alice --register
//! ```
//!
//! Groups: `/group NAME: friend1, friend2`, `/go ID` (any conversation from
//! `/chats`), `/invite NAME`, `/kick NAME`, `/leave`. Photos: `/photo PATH`
//! (or `/photo PATH: caption`) sends one; `/save MEDIA_ID PATH` downloads
//! one.
//!
//! Commands: `/friends` (with online / last active), `/add NAME`, `/accept NAME`, `/chats`, `/open NAME`,
//! `/history`, `/block NAME`, `/unblock NAME`, `/quit`; any other line is sent to the open
//! conversation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chat_client::{Client, ClientConfig, Event, HistoryDirection, PhotoUpload, proto};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "Terminal chat against a chat-server")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Name on the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA certificate to trust (the server prints where its dev CA is).
    #[arg(long, default_value = "data/certs/ca.pem")]
    ca: PathBuf,
    /// User name.
    #[arg(long)]
    user: String,
    /// Password (asked on stdin when omitted).
    #[arg(long, env = "CHAT_PASSWORD")]
    password: Option<String>,
    /// Create the account first.
    #[arg(long)]
    register: bool,
}

/// What the screen remembers about the open conversation.
#[derive(Default)]
struct Screen {
    /// Open conversation and the friend it is with.
    open: Option<(u64, String)>,
    /// User id -> name, for printing senders.
    names: HashMap<u64, String>,
    /// (conversation, member) -> (delivered, seen) last shown.
    receipts: HashMap<(u64, u64), (u64, u64)>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let password = match args.password {
        Some(p) => p,
        None => {
            println!("password for {}:", args.user);
            lines.next_line().await?.context("no password given")?
        }
    };
    let config = ClientConfig::new(args.server, args.server_name).with_ca_file(&args.ca)?;
    let (client, mut events) = if args.register {
        Client::register(config, &args.user, &password).await?
    } else {
        Client::login(config, &args.user, &password).await?
    };
    let me = client.identity();
    println!(
        "logged in as {} (id {}). /friends /add /accept /chats /open /history /photo /save /quit",
        me.username, me.user_id
    );
    let mut screen = Screen::default();
    screen.names.insert(me.user_id, me.username.clone());
    refresh_friends(&client, &mut screen).await?;

    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                // Answers travel behind the events of their stream, so the
                // events are drained while the command waits for one, and
                // shown once it is done (it may change the screen).
                let mut held = Vec::new();
                let result = {
                    let run = command(&client, &mut screen, line.trim());
                    tokio::pin!(run);
                    loop {
                        tokio::select! {
                            result = &mut run => break result,
                            Some(event) = events.next() => held.push(event),
                        }
                    }
                };
                for event in held {
                    show(&client, &mut screen, event);
                }
                match result {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => println!("! {e}"),
                }
            }
            event = events.next() => {
                let Some(event) = event else { break };
                show(&client, &mut screen, event);
            }
        }
    }
    // Leaves gracefully: what was shown is acknowledged, so it does not
    // come again next time.
    client.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

async fn refresh_friends(client: &Client, screen: &mut Screen) -> Result<proto::FriendList> {
    let list = client.friends().await?;
    for user in list
        .friends
        .iter()
        .chain(&list.incoming)
        .chain(&list.outgoing)
        .chain(&list.blocked)
    {
        screen.names.insert(user.user_id, user.username.clone());
    }
    Ok(list)
}

fn id_of(screen: &Screen, name: &str) -> Result<u64> {
    screen
        .names
        .iter()
        .find(|(_, n)| n.as_str() == name)
        .map(|(id, _)| *id)
        .with_context(|| format!("{name} is not in your friends or requests (try /friends)"))
}

/// Runs one input line; false to quit.
async fn command(client: &Client, screen: &mut Screen, line: &str) -> Result<bool> {
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "" => {}
        "/quit" => return Ok(false),
        "/friends" => {
            let list = refresh_friends(client, screen).await?;
            let names = |v: &[proto::UserRef]| {
                v.iter()
                    .map(|u| u.username.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!("friends: {}", names(&list.friends));
            // Watch the friends now on screen; changes arrive as events.
            let ids: Vec<u64> = list.friends.iter().map(|f| f.user_id).collect();
            for state in client.subscribe_presence(&ids).await? {
                let who = screen
                    .names
                    .get(&state.user_id)
                    .cloned()
                    .unwrap_or_default();
                println!("  {who}: {}", describe(&state));
            }
            println!("requests to you: {}", names(&list.incoming));
            println!("your requests: {}", names(&list.outgoing));
            if !list.blocked.is_empty() {
                println!("blocked: {}", names(&list.blocked));
            }
        }
        "/add" => {
            client.send_friend_request(rest).await?;
            println!("friend request sent to {rest}");
        }
        "/accept" => {
            refresh_friends(client, screen).await?;
            client.accept_friend(id_of(screen, rest)?).await?;
            println!("you and {rest} are now friends");
        }
        "/block" | "/unblock" => {
            // Anyone whose name is on screen: friends, requests, members
            // of a conversation opened with /go.
            refresh_friends(client, screen).await?;
            let user = id_of(screen, rest.trim())?;
            if cmd == "/block" {
                client.block(user).await?;
                println!("{rest} is blocked");
            } else {
                client.unblock(user).await?;
                println!("{rest} is no longer blocked");
            }
        }
        "/chats" => {
            for c in client.conversations(20, None).await? {
                let with: Vec<_> = c
                    .members
                    .iter()
                    .filter(|m| m.user_id != client.identity().user_id)
                    .map(|m| m.username.clone())
                    .collect();
                let preview = c.last_message.map(|m| m.text).unwrap_or_default();
                let title = if c.former_member {
                    format!("{} (you left)", c.name)
                } else if c.name.is_empty() {
                    with.join(", ")
                } else {
                    format!("{} ({})", c.name, with.join(", "))
                };
                println!(
                    "[{}] {:>3} unread  {title}: {preview}",
                    c.conversation_id, c.unread_count
                );
            }
        }
        "/open" => {
            refresh_friends(client, screen).await?;
            let info = client.open_direct(id_of(screen, rest)?).await?;
            screen.open = Some((info.conversation_id, rest.to_string()));
            println!("-- chatting with {rest} --");
            print_history(client, screen, info.conversation_id).await?;
        }
        "/group" => {
            // /group NAME: a, b, c
            let (name, who) = rest
                .split_once(':')
                .context("usage: /group NAME: friend1, friend2")?;
            refresh_friends(client, screen).await?;
            let mut ids = Vec::new();
            for friend in who.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                ids.push(id_of(screen, friend)?);
            }
            let info = client.create_group(name.trim(), &ids).await?;
            screen.open = Some((info.conversation_id, name.trim().to_string()));
            println!("-- group \"{}\" [{}] --", name.trim(), info.conversation_id);
        }
        "/go" => {
            // Open any conversation by the id /chats shows.
            let id: u64 = rest.trim().parse().context("usage: /go ID (see /chats)")?;
            let info = client.conversation(id).await?;
            for member in &info.members {
                screen.names.insert(member.user_id, member.username.clone());
            }
            let title = if info.name.is_empty() {
                format!("conversation {id}")
            } else {
                info.name.clone()
            };
            screen.open = Some((id, title.clone()));
            println!("-- {title} --");
            print_history(client, screen, id).await?;
        }
        "/invite" | "/kick" => {
            let Some((conversation, _)) = screen.open.clone() else {
                bail!("no conversation open")
            };
            refresh_friends(client, screen).await?;
            let user = id_of(screen, rest.trim())?;
            if cmd == "/invite" {
                client.add_members(conversation, &[user]).await?;
            } else {
                client.remove_member(conversation, user).await?;
            }
        }
        "/leave" => {
            let Some((conversation, _)) = screen.open.take() else {
                bail!("no conversation open")
            };
            client.leave_group(conversation).await?;
            println!("-- you left --");
        }
        "/history" => {
            let Some((conversation, _)) = screen.open.clone() else {
                bail!("no conversation open (/open NAME)")
            };
            print_history(client, screen, conversation).await?;
        }
        "/photo" => {
            let Some((conversation, _)) = screen.open.clone() else {
                bail!("no conversation open (/open NAME)")
            };
            let (path, caption) = rest.split_once(": ").unwrap_or((rest, ""));
            let path = path.trim();
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
            let media_type = photo_type(&bytes)
                .context("not a JPEG, PNG, WebP or HEIC file (by its first bytes)")?;
            let (client, caption) = (client.clone(), caption.to_owned());
            // Spawned, as texts are: the upload may take a while.
            tokio::spawn(async move {
                let upload = PhotoUpload {
                    bytes: bytes.into(),
                    media_type,
                    // The server does not decode images; a real app sends
                    // the dimensions it read.
                    width: 1,
                    height: 1,
                    // Nor does this example make a preview.
                    preview: Default::default(),
                };
                let sent = match client.upload_photo(upload).await {
                    Ok(media_id) => client.send_photo(conversation, &media_id, &caption).await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(ack) => println!("  ✓ photo sent (#{})", ack.seq),
                    Err(e) => println!("  ✗ photo not sent: {e}"),
                }
            });
        }
        "/save" => {
            let (id, path) = rest.split_once(' ').context("usage: /save MEDIA_ID PATH")?;
            let (photo, bytes) = client.download_photo(id.trim()).await?;
            std::fs::write(path.trim(), &bytes)
                .with_context(|| format!("cannot write {}", path.trim()))?;
            println!("-- saved {} bytes to {} --", photo.size, path.trim());
        }
        _ if cmd.starts_with('/') => bail!("unknown command {cmd}"),
        _ => {
            let Some((conversation, _)) = screen.open.clone() else {
                bail!("no conversation open (/open NAME)")
            };
            // Spawned, not awaited here: this loop also drains the events,
            // and the ack travels behind the messages queued before it.
            let (client, text) = (client.clone(), line.to_owned());
            tokio::spawn(async move {
                match client.send_text(conversation, &text).await {
                    Ok(ack) => println!("  ✓ sent (#{})", ack.seq),
                    Err(e) => println!("  ✗ not sent: {e}"),
                }
            });
        }
    }
    Ok(true)
}

/// The photo format of a file, by its first bytes.
fn photo_type(bytes: &[u8]) -> Option<proto::MediaType> {
    let start = &bytes[..bytes.len().min(chat_protocol::media::SIGNATURE_LEN)];
    chat_protocol::media::FORMATS
        .into_iter()
        .find(|kind| kind.matches(start))
}

/// A message as a line: its text, and for a photo its size and media id.
fn line_of(m: &proto::Message) -> String {
    match &m.photo {
        Some(p) => format!(
            "[photo {} bytes, /save {} PATH] {}",
            p.size, p.media_id, m.text
        ),
        None => m.text.clone(),
    }
}

async fn print_history(client: &Client, screen: &Screen, conversation: u64) -> Result<()> {
    let page = client
        .history(conversation, HistoryDirection::Backward, 0, 20)
        .await?;
    let last = page.messages.last().map(|m| m.seq);
    for m in &page.messages {
        let who = screen
            .names
            .get(&m.sender_id)
            .cloned()
            .unwrap_or_else(|| m.sender_id.to_string());
        println!("#{:<4} {who}: {}", m.seq, line_of(m));
    }
    if let Some(seq) = last {
        client.mark_seen(conversation, seq).await?;
    }
    Ok(())
}

fn show(client: &Client, screen: &mut Screen, event: Event) {
    match event {
        Event::Message(m) => {
            let who = screen
                .names
                .get(&m.sender_id)
                .cloned()
                .unwrap_or_else(|| m.sender_id.to_string());
            println!("#{:<4} {who}: {}", m.seq, line_of(&m));
            // Reading it on screen counts as seen when its chat is open.
            if screen
                .open
                .as_ref()
                .is_some_and(|(c, _)| *c == m.conversation_id)
            {
                // Spawned: its answer travels behind events this loop has
                // yet to drain.
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client.mark_seen(m.conversation_id, m.seq).await;
                });
            }
        }
        Event::Receipt(r) => {
            let who = screen
                .names
                .get(&r.user_id)
                .cloned()
                .unwrap_or_else(|| r.user_id.to_string());
            let shown = screen
                .receipts
                .entry((r.conversation_id, r.user_id))
                .or_default();
            // Receipts carry absolute watermarks; show only what moved.
            if r.delivered_seq > shown.0 {
                println!("  ✓✓ delivered to {who} up to #{}", r.delivered_seq);
            }
            if r.seen_seq > shown.1 {
                println!("  seen by {who} up to #{}", r.seen_seq);
                // In groups, the count of readers is what people look at.
                if let Some(status) = client.receipt_status(r.conversation_id, r.seen_seq)
                    && status.members > 1
                {
                    println!(
                        "  #{} seen by {} of {}",
                        r.seen_seq, status.seen, status.members
                    );
                }
            }
            *shown = (shown.0.max(r.delivered_seq), shown.1.max(r.seen_seq));
        }
        Event::Friend(f) => {
            let kind = proto::friend_event::Kind::try_from(f.kind).unwrap_or_default();
            if let Some(user) = f.user {
                screen.names.insert(user.user_id, user.username.clone());
                println!("* {}: {:?}", user.username, kind);
            }
        }
        Event::Presence(state) => {
            let who = screen
                .names
                .get(&state.user_id)
                .cloned()
                .unwrap_or_else(|| state.user_id.to_string());
            println!("* {who} is {}", describe(&state));
        }
        Event::Connected => println!("* reconnected"),
        Event::Disconnected { code } => println!("* connection lost ({code:?}); reconnecting"),
        Event::SessionEnded { code } => println!("* session ended ({code}); log in again"),
        _ => {}
    }
}

/// "online" or "active 5m ago", the way Messenger shows it.
fn describe(state: &proto::PresenceState) -> String {
    if state.online {
        return "online".into();
    }
    if state.last_active_ms == 0 {
        return "offline".into();
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = ((now_ms - state.last_active_ms).max(0) / 1000) as u64;
    let ago = match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    format!("active {ago} ago")
}
