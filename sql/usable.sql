-- usable: the photos worth looking at. Drops low-resolution, blurred, badly exposed and
-- subject-less photos (no fluke found by the detect stage) and photos a person called bad, then
-- exact and near duplicates (keeping the best copy of each).
-- Parameters ($name) come from the stage's `params` in the pipeline file.
WITH good AS (
  SELECT * FROM images
  WHERE width >= $min_width AND height >= $min_height
    AND sharpness >= $min_sharpness
    AND brightness BETWEEN $min_brightness AND $max_brightness
    AND clipped_dark <= $max_clipped AND clipped_bright <= $max_clipped
    AND photo_id IN (SELECT photo_id FROM detections WHERE score >= $min_subject_score)
    -- A person called it a bad photo on the review page (images.decision; an undo takes it back).
    AND (decision IS NULL OR decision <> 'bad')
),
-- Exact duplicates share the content hash; the copy kept is the largest, then the first by name.
ranked AS (
  SELECT *, row_number() OVER (
    PARTITION BY content_hash ORDER BY width * height DESC, size_bytes DESC, photo_id
  ) AS copy_rank
  FROM good
),
unique_photos AS (SELECT * EXCLUDE (copy_rank) FROM ranked WHERE copy_rank = 1),
-- Near duplicates (re-encoded or resized copies): perceptual hashes within $near_duplicate_bits.
-- A photo is dropped when a better copy exists: more pixels, then more bytes, then first by name.
near_copies AS (
  SELECT DISTINCT worse.photo_id
  FROM unique_photos worse JOIN unique_photos better
    ON worse.photo_id <> better.photo_id
   AND hamming(worse.phash, better.phash) <= $near_duplicate_bits
  WHERE better.width * better.height > worse.width * worse.height
     OR (better.width * better.height = worse.width * worse.height
         AND (better.size_bytes > worse.size_bytes
              OR (better.size_bytes = worse.size_bytes AND better.photo_id < worse.photo_id)))
)
SELECT * FROM unique_photos
WHERE photo_id NOT IN (SELECT photo_id FROM near_copies)
