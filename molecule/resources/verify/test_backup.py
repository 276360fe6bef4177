"""backup: write data, back it up with backup.yml, wipe it, restore.yml: the data is back, equal."""

from __future__ import annotations

import httpx
from zeus_hosts import REPO_ROOT, Deployment, create_user, login, stream_chat_message

# Not the repository's backups/: those are an operator's real dumps.
BACKUP_DIR = REPO_ROOT / ".molecule-work" / "backups"


def snapshot(deployment: Deployment, email: str) -> dict:
    """Everything stored for one user, as PostgreSQL holds it."""
    return deployment.sql_json(
        "select json_build_object("
        " 'user', (select json_build_object('id', id, 'email', email, 'role', role, 'disabled', disabled,"
        "  'password_hash', password_hash) from users where email = '" + email + "'),"
        " 'conversations', (select json_agg(json_build_object('id', c.id, 'title', c.title,"
        "  'created_at', c.created_at) order by c.id) from conversations c join users u on u.id = c.user_id"
        "  where u.email = '" + email + "'),"
        " 'messages', (select json_agg(json_build_object('id', m.id, 'conversation_id', m.conversation_id,"
        "  'role', m.role, 'content', m.content, 'status', m.status) order by m.id) from messages m"
        "  join conversations c on c.id = m.conversation_id join users u on u.id = c.user_id"
        "  where u.email = '" + email + "'))"
    )


def test_backup_wipe_restore_gives_the_same_data(deployment: Deployment, admin: httpx.Client) -> None:
    email, password = create_user(admin, role="analyst", prefix="backup")
    with deployment.client() as client:
        login(client, email, password)
        for title in ("kept by the backup", "also kept"):
            conversation = client.post("/api/conversations", json={"title": title})
            assert conversation.status_code == 201, conversation.text
            reply = stream_chat_message(client, conversation.json()["id"], f"Say something about {title}.")
            assert reply.first("done") is not None, reply.events[-2:] or reply.transport_error
        before = snapshot(deployment, email)
        assert len(before["conversations"]) == 2 and len(before["messages"]) == 4, before

        dumps_before = set(BACKUP_DIR.glob("*")) if BACKUP_DIR.is_dir() else set()
        deployment.run_playbook("playbooks/backup.yml", f"backup_dir={BACKUP_DIR}", log_name="backup")
        new_dumps = sorted(set(BACKUP_DIR.glob("*")) - dumps_before)
        assert len(new_dumps) == 1, f"backup.yml should leave one new file in {BACKUP_DIR}, found {new_dumps}"
        assert new_dumps[0].stat().st_size > 0, f"{new_dumps[0]} is empty"
        print(f"backup.yml fetched {new_dumps[0].name} ({new_dumps[0].stat().st_size} bytes)")

        # The accident: the conversations are deleted, and work goes on after the backup.
        for conversation in before["conversations"]:
            assert client.delete(f"/api/conversations/{conversation['id']}").status_code == 204
        after_backup = client.post("/api/conversations", json={"title": "written after the backup"})
        assert after_backup.status_code == 201, after_backup.text
        wiped = snapshot(deployment, email)
        assert wiped["conversations"] != before["conversations"] and wiped["messages"] is None, wiped

    deployment.run_playbook(
        "playbooks/restore.yml", f"file={new_dumps[0]}", "confirm_restore=yes", log_name="restore"
    )

    assert snapshot(deployment, email) == before
    # The service works on the restored database: the user logs in through nginx and sees the data.
    with deployment.client() as client:
        login(client, email, password)
        titles = sorted(c["title"] for c in client.get("/api/conversations").json())
    assert titles == ["also kept", "kept by the backup"], titles
