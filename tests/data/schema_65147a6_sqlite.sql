-- The schema release 65147a6 created (its notifier/storage.py, metadata.create_all), sqlite dialect.
-- Generated once, with SQLAlchemy 2.1.9, from `git archive 65147a6`: CreateTable and CreateIndex
-- compiled for this dialect over that release's metadata.sorted_tables (trailing blanks stripped).
-- Frozen here so tests/test_migrations.py builds an old database without git. Do not edit.
-- Statements are separated by lines holding only ';'.

CREATE TABLE dispatchers (
	id INTEGER NOT NULL,
	host_id VARCHAR(128) NOT NULL,
	pid INTEGER NOT NULL,
	started_at DOUBLE NOT NULL,
	heartbeat_at DOUBLE NOT NULL,
	stopped_at DOUBLE,
	PRIMARY KEY (id)
)
;
CREATE INDEX ix_dispatchers_host ON dispatchers (host_id, heartbeat_at)
;
CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL,
	value VARCHAR(255) NOT NULL,
	PRIMARY KEY ("key")
)
;
CREATE TABLE users (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (token_hash)
)
;
CREATE TABLE chats (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	creator_id INTEGER NOT NULL,
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(creator_id) REFERENCES users (id)
)
;
CREATE TABLE devices (
	id INTEGER NOT NULL,
	user_id INTEGER NOT NULL,
	platform VARCHAR(8) NOT NULL,
	token VARCHAR(4096) NOT NULL,
	app VARCHAR(255),
	enabled BOOLEAN NOT NULL,
	disabled_reason VARCHAR(64),
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_devices_token UNIQUE (token),
	FOREIGN KEY(user_id) REFERENCES users (id)
)
;
CREATE INDEX ix_devices_user_id ON devices (user_id)
;
CREATE TABLE members (
	chat_id INTEGER NOT NULL,
	user_id INTEGER NOT NULL,
	muted_until DOUBLE,
	joined_at DOUBLE NOT NULL,
	PRIMARY KEY (chat_id, user_id),
	FOREIGN KEY(chat_id) REFERENCES chats (id),
	FOREIGN KEY(user_id) REFERENCES users (id)
)
;
CREATE INDEX ix_members_user ON members (user_id, chat_id)
;
CREATE TABLE messages (
	id INTEGER NOT NULL,
	chat_id INTEGER NOT NULL,
	sender_id INTEGER NOT NULL,
	text TEXT NOT NULL,
	client_id VARCHAR(64),
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_messages_client_id UNIQUE (chat_id, sender_id, client_id),
	FOREIGN KEY(chat_id) REFERENCES chats (id),
	FOREIGN KEY(sender_id) REFERENCES users (id)
)
;
CREATE INDEX ix_messages_chat ON messages (chat_id, id)
;
CREATE TABLE deliveries (
	id INTEGER NOT NULL,
	message_id INTEGER NOT NULL,
	device_id INTEGER NOT NULL,
	platform VARCHAR(8) NOT NULL,
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DOUBLE NOT NULL,
	lease_owner VARCHAR(128),
	lease_until DOUBLE,
	last_status INTEGER,
	last_reason VARCHAR(255),
	sent_at DOUBLE,
	handled_by VARCHAR(128),
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_deliveries_message_device UNIQUE (message_id, device_id),
	FOREIGN KEY(message_id) REFERENCES messages (id),
	FOREIGN KEY(device_id) REFERENCES devices (id)
)
;
CREATE INDEX ix_deliveries_due ON deliveries (state, next_attempt_at)
;
CREATE TABLE push_jobs (
	id INTEGER NOT NULL,
	message_id INTEGER NOT NULL,
	state VARCHAR(16) NOT NULL,
	cursor_user INTEGER,
	cursor_device INTEGER,
	created_at DOUBLE NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (message_id),
	FOREIGN KEY(message_id) REFERENCES messages (id)
)
;
CREATE INDEX ix_push_jobs_state ON push_jobs (state, id)
;
