//! The smallest useful program: log in, send one text to a friend, print
//! the "sent" ack, and wait for the "delivered" receipt.
//!
//! ```text
//! cargo run -p chat-client --example send_text -- alice 'password' bob 'hello'
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use chat_client::{Client, ClientConfig, Event};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [user, password, friend, text] = <[String; 4]>::try_from(args)
        .map_err(|_| anyhow::anyhow!("usage: send_text USER PASSWORD FRIEND TEXT"))?;
    let config = ClientConfig::new("127.0.0.1:4433".parse()?, "localhost")
        .with_ca_file("data/certs/ca.pem")?;
    let (client, mut events) = Client::login(config, &user, &password).await?;
    let friends = client.friends().await?;
    let friend_id = friends
        .friends
        .iter()
        .find(|f| f.username == friend)
        .context("not a friend")?
        .user_id;
    let chat = client.open_direct(friend_id).await?;
    let ack = client.send_text(chat.conversation_id, &text).await?;
    println!("sent: seq {} id {}", ack.seq, ack.message_id);
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            if let Event::Receipt(r) = event
                && r.conversation_id == chat.conversation_id
                && r.delivered_seq >= ack.seq
            {
                return true;
            }
        }
        false
    });
    match wait.await {
        Ok(true) => println!("delivered"),
        _ => println!("not delivered yet (is {friend} online?)"),
    }
    client.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
