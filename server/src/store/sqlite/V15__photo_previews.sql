-- A photo's preview: the few KB the uploading app made (MediaUpload.
-- preview), carried in the PHOTO message (and so in messages.attachment)
-- for showing the photo before its bytes are downloaded. Empty for none,
-- as for every upload made before this migration.
ALTER TABLE media ADD COLUMN preview BLOB NOT NULL DEFAULT x'';
