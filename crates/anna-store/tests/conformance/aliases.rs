//! Chat aliases: a chat's phone JID and LID are one chat.

use anna_domain::Session;

use super::*;
use crate::sessions::insert_user;

conformance!(addresses_of_one_chat_are_linked_and_merged);

async fn addresses_of_one_chat_are_linked_and_merged(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "aliases@example.com").await?;
    let (session, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.commit().await?;
    let (phone, lid, other_lid) = ("15550100123@s.whatsapp.net", "200015550100123@lid", "299999@lid");
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());

    assert_eq!(store.chat_addresses(session.id, phone).await?, vec![phone.to_owned()], "unknown: itself");
    let mut uow = store.begin().await?;
    uow.link_chat_aliases(tenant, session.id, &[pair(lid, phone)]).await?;
    // Linked twice (a redelivered event, another reader): the same rows.
    uow.link_chat_aliases(tenant, session.id, &[pair(phone, lid)]).await?;
    uow.commit().await?;
    assert_eq!(store.chat_addresses(session.id, lid).await?, vec![phone.to_owned(), lid.to_owned()]);
    assert_eq!(store.chat_addresses(session.id, phone).await?, vec![phone.to_owned(), lid.to_owned()]);
    assert_eq!(
        store.list_chat_aliases(session.id).await?,
        vec![(phone.to_owned(), phone.to_owned()), (lid.to_owned(), phone.to_owned())]
    );

    // Two phone numbers are two people, whatever says otherwise.
    let mut uow = store.begin().await?;
    uow.link_chat_aliases(tenant, session.id, &[pair("15550100999@s.whatsapp.net", phone)]).await?;
    uow.commit().await?;
    assert_eq!(store.chat_addresses(session.id, phone).await?, vec![phone.to_owned(), lid.to_owned()]);

    // A recycled number: its new owner's LID takes over; the former owner's LID is a chat of
    // its own again.
    let mut uow = store.begin().await?;
    uow.link_chat_aliases(tenant, session.id, &[pair(phone, other_lid)]).await?;
    uow.commit().await?;
    assert_eq!(store.chat_addresses(session.id, phone).await?, vec![phone.to_owned(), other_lid.to_owned()]);
    assert_eq!(store.chat_addresses(session.id, lid).await?, vec![lid.to_owned()]);

    // Another session knows nothing of it; a deleted session gets nothing.
    let (elsewhere, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&elsewhere).await?;
    uow.commit().await?;
    assert_eq!(store.chat_addresses(elsewhere.id, other_lid).await?, vec![other_lid.to_owned()]);
    assert!(store.list_chat_aliases(elsewhere.id).await?.is_empty());
    let (gone, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.link_chat_aliases(tenant, gone.id, &[pair(lid, phone)]).await?;
    uow.commit().await?;
    assert!(store.list_chat_aliases(gone.id).await?.is_empty());
    Ok(())
}
