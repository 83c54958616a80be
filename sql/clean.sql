-- clean: the photos a re-identification model can learn from. Drops unlabeled photos and
-- individuals with fewer than $min_photos_per_individual usable photos (a singleton has no
-- positive pair to learn from or to be found by).
WITH labeled AS (
  SELECT * FROM usable WHERE individual_id IS NOT NULL AND individual_id <> ''
),
enough AS (
  SELECT individual_id FROM labeled
  GROUP BY individual_id HAVING count(*) >= $min_photos_per_individual
)
SELECT * FROM labeled WHERE individual_id IN (SELECT individual_id FROM enough)
