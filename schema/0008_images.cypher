// 0008: images of image+text prompts. One (:Image {sha256}) per image file (its content hash),
// linked from each prompt that shows it; image soft tokens are (:Node:ImageTokenNode) with their
// grid cell (row, col), k and a rollout summary, found by prompt and position (image labels,
// region queries).
CREATE CONSTRAINT image_sha256 IF NOT EXISTS FOR (i:Image) REQUIRE i.sha256 IS UNIQUE;
CREATE INDEX image_token_prompt_pos IF NOT EXISTS FOR (n:ImageTokenNode) ON (n.prompt, n.pos);
