-- A random name for this history, made once: a node checks it against
-- the one its Redis prefix was claimed for, so two deployments sharing a
-- Redis and a prefix (or a history replaced under a kept Redis) cannot
-- mix their caches and unread queues.
CREATE TABLE history_identity (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    id       TEXT NOT NULL
);
-- gen_random_uuid: built in since Postgres 13 (md5 fails under FIPS).
INSERT INTO history_identity (only_row, id)
VALUES (1, replace(gen_random_uuid()::text, '-', ''));
