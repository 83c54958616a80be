//! Decides, before any pixel is drawn, which file shows whom and which defect each carries.
//! Keeping this separate and single-threaded makes the lake layout depend on the seed only.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use rand::Rng;
use rand::seq::SliceRandom;

use super::DemoOptions;
use super::noise::{DOMAIN_PLAN, DOMAIN_REGULAR, DOMAIN_SINGLETON, rng_for};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Defect {
    None,
    Tiny,
    Blurred,
    Overexposed,
    Underexposed,
    NoSubject,
    ExactDuplicate,
    NearDuplicate,
    Singleton,
    Unlabeled,
    Corrupt,
    Truncated,
    Empty,
    NotAnImage,
    Png,
    Png16,
    Cmyk,
    ExifRotated,
    Grayscale,
    MotionPhoto,
    Webp,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Expected {
    Keep,
    Drop,
    Reject,
}

impl Expected {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Expected::Keep => "keep",
            Expected::Drop => "drop",
            Expected::Reject => "reject",
        }
    }
}

impl Defect {
    /// Every planted kind (all but `None`), in the order the README lists them.
    pub(crate) const PLANTED: [Defect; 20] = [
        Defect::Tiny,
        Defect::Blurred,
        Defect::Overexposed,
        Defect::Underexposed,
        Defect::NoSubject,
        Defect::ExactDuplicate,
        Defect::NearDuplicate,
        Defect::Singleton,
        Defect::Unlabeled,
        Defect::Corrupt,
        Defect::Truncated,
        Defect::Empty,
        Defect::NotAnImage,
        Defect::Png,
        Defect::Png16,
        Defect::Cmyk,
        Defect::ExifRotated,
        Defect::Grayscale,
        Defect::MotionPhoto,
        Defect::Webp,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Defect::None => "none",
            Defect::Tiny => "tiny",
            Defect::Blurred => "blurred",
            Defect::Overexposed => "overexposed",
            Defect::Underexposed => "underexposed",
            Defect::NoSubject => "no_subject",
            Defect::ExactDuplicate => "exact_duplicate",
            Defect::NearDuplicate => "near_duplicate",
            Defect::Singleton => "singleton",
            Defect::Unlabeled => "unlabeled",
            Defect::Corrupt => "corrupt",
            Defect::Truncated => "truncated",
            Defect::Empty => "empty",
            Defect::NotAnImage => "not_an_image",
            Defect::Png => "png",
            Defect::Png16 => "png16",
            Defect::Cmyk => "cmyk",
            Defect::ExifRotated => "exif_rotated",
            Defect::Grayscale => "grayscale",
            Defect::MotionPhoto => "motion_photo",
            Defect::Webp => "webp",
        }
    }

    pub(crate) fn expected(self) -> Expected {
        match self {
            Defect::None
            | Defect::Png
            | Defect::Png16
            | Defect::Cmyk
            | Defect::ExifRotated
            | Defect::Grayscale
            | Defect::MotionPhoto
            | Defect::Webp => {
                Expected::Keep
            }
            Defect::Corrupt | Defect::Truncated | Defect::Empty | Defect::NotAnImage => Expected::Reject,
            _ => Expected::Drop,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Defect::Png | Defect::Png16 => "png",
            Defect::Webp => "webp",
            _ => "jpg",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Who {
    Regular(usize),
    Singleton(usize),
}

impl Who {
    pub(crate) fn id(self) -> String {
        match self {
            Who::Regular(i) => format!("W{:03}", i + 1),
            Who::Singleton(i) => format!("S{:03}", i + 1),
        }
    }

    pub(crate) fn rng(self, seed: u64) -> rand_chacha::ChaCha8Rng {
        match self {
            Who::Regular(i) => rng_for(seed, DOMAIN_REGULAR, i as u64),
            Who::Singleton(i) => rng_for(seed, DOMAIN_SINGLETON, i as u64),
        }
    }
}

/// A second file derived from a clean photo's render.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Dup {
    /// Byte-identical copy, `<stem>_copy.jpg`.
    Copy,
    /// Same pixels re-encoded at low quality, `<stem>_dup.jpg`.
    Requality,
    /// Same pixels downscaled to 60-80 % and re-encoded, `<stem>_dup.jpg`.
    Resize,
}

pub(crate) struct Shot {
    /// File number in `IMG_%05d`.
    pub(crate) index: usize,
    pub(crate) defect: Defect,
    /// Whose fluke the picture shows; None for files without a fluke.
    pub(crate) subject: Option<Who>,
    /// What labels.csv claims; None for the unlabeled defect.
    pub(crate) label: Option<Who>,
    /// The individual_id column of ground_truth.csv.
    pub(crate) truth: Who,
    pub(crate) dup: Option<Dup>,
}

impl Shot {
    pub(crate) fn stem(&self) -> String {
        format!("IMG_{:05}", self.index)
    }

    pub(crate) fn file_name(&self) -> String {
        format!("{}.{}", self.stem(), self.defect.extension())
    }

    pub(crate) fn dup_file_name(&self) -> Option<(String, Defect)> {
        self.dup.map(|d| match d {
            Dup::Copy => (format!("{}_copy.jpg", self.stem()), Defect::ExactDuplicate),
            Dup::Requality | Dup::Resize => (format!("{}_dup.jpg", self.stem()), Defect::NearDuplicate),
        })
    }
}

pub(crate) struct Plan {
    pub(crate) shots: Vec<Shot>,
    pub(crate) individuals: usize,
    /// Shots grouped by the fluke they show, so each worker builds an individual's sprite once.
    pub(crate) groups: Vec<(Option<Who>, Vec<usize>)>,
}

pub(crate) fn build(opts: &DemoOptions) -> Result<Plan> {
    let (n, per) = (opts.individuals, opts.photos_per);
    ensure!(n >= 1, "need at least one individual");
    ensure!(per >= 3, "photos_per must be at least 3 so that no regular individual can become a singleton");
    let clean = n * per;
    // Defect counts scale with the lake: 2 of each at the default 24 × 8, 1 for tiny test lakes.
    let k = (clean / 80).max(1);
    let exif = if k >= 2 { 2 } else { 1 };
    let needed = 6 + exif + 2 * k;
    ensure!(
        clean >= needed,
        "individuals × photos_per = {clean} is too small to host the format variants and duplicates ({needed} clean photos needed)"
    );

    let mut rng = rng_for(opts.seed, DOMAIN_PLAN, 0);
    let mut shots = Vec::with_capacity(clean + 12 * k);
    for i in 0..n {
        for _ in 0..per {
            let who = Who::Regular(i);
            shots.push(Shot {
                index: shots.len() + 1,
                defect: Defect::None,
                subject: Some(who),
                label: Some(who),
                truth: who,
                dup: None,
            });
        }
    }
    // Format variants and duplicate sources are distinct clean photos, so every file carries at
    // most one defect and a duplicate's original is always an ordinary keep photo.
    let mut order: Vec<usize> = (0..clean).collect();
    order.shuffle(&mut rng);
    let mut pick = order.into_iter();
    let mut roles: Vec<(Defect, Option<Dup>)> =
        vec![(Defect::Png, None), (Defect::Png16, None), (Defect::Cmyk, None), (Defect::Grayscale, None), (Defect::MotionPhoto, None), (Defect::Webp, None)];
    roles.extend(std::iter::repeat_n((Defect::ExifRotated, None), exif));
    roles.extend(std::iter::repeat_n((Defect::None, Some(Dup::Copy)), k));
    roles.extend((0..k).map(|j| (Defect::None, Some(if j % 2 == 0 { Dup::Requality } else { Dup::Resize }))));
    for (defect, dup) in roles {
        let i = pick.next().context("ran out of clean photos for format variants and duplicates")?;
        shots[i].defect = defect;
        shots[i].dup = dup;
    }

    let mut extra: Vec<Defect> = Vec::with_capacity(11 * k);
    for d in [
        Defect::Tiny,
        Defect::Blurred,
        Defect::Overexposed,
        Defect::Underexposed,
        Defect::NoSubject,
        Defect::Unlabeled,
        Defect::Corrupt,
        Defect::Truncated,
        Defect::Empty,
        Defect::NotAnImage,
        Defect::Singleton,
    ] {
        extra.extend(std::iter::repeat_n(d, k));
    }
    // Shuffled so that a file's number says nothing about its defect.
    extra.shuffle(&mut rng);
    let mut singletons = 0;
    for d in extra {
        let who = if d == Defect::Singleton {
            singletons += 1;
            Who::Singleton(singletons - 1)
        } else {
            Who::Regular(rng.random_range(0..n))
        };
        let subject = match d {
            Defect::NoSubject | Defect::Empty | Defect::NotAnImage => None,
            _ => Some(who),
        };
        let label = (d != Defect::Unlabeled).then_some(who);
        shots.push(Shot { index: shots.len() + 1, defect: d, subject, label, truth: who, dup: None });
    }

    let mut by_subject: BTreeMap<Option<Who>, Vec<usize>> = BTreeMap::new();
    for (i, s) in shots.iter().enumerate() {
        by_subject.entry(s.subject).or_default().push(i);
    }
    let mut groups: Vec<(Option<Who>, Vec<usize>)> = by_subject.into_iter().collect();
    // Biggest groups first so the two workers finish close together.
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    Ok(Plan { shots, individuals: n + singletons, groups })
}
