//! Folding a job's log across its ranks: lines that every rank prints alike (numbers may
//! differ) become one line prefixed by the rank set, so a log is not multiplied by the world
//! size. `cohort logs --collapse` prints this form; it loses nothing ([`unfold`] gives every
//! rank's lines back, in order).
//!
//! - Two lines are alike when they come from the same stream and have the same *template*:
//!   the text with every number (`12`, `0.4321`, `1e-3`) replaced by a placeholder.
//! - A group holds at most one line per rank. A rank's line joins the oldest group of its
//!   template that comes after the group of the rank's previous line on the same stream;
//!   otherwise it starts a new group at the end. Groups print in the order they were started,
//!   so every rank's lines of each stream print in the order the rank wrote them. (Standard
//!   output and standard error are separate pipes, read apart: their relative order was never
//!   kept, and folding does not pretend to keep it.)
//! - A group of one rank prints as `cohort logs` prints any line: `[rank 2] text` (`[rank 2]!`
//!   for standard error). A group of several prints `[ranks 0-3] text`, the numbers that
//!   differ between its ranks as `{v0|v1|v2|v3}` (one value per rank, in rank order), and
//!   literal braces doubled (`{{`, `}}`), so that the folded form reads back unambiguously.
//!
//! Memory is bounded by the log: the groups of the whole log are kept until it is printed
//! ([`Folder::finish`]); a job's log is bounded by the coordinator. A rank may join only the
//! newest [`MAX_OPEN_GROUPS`] groups of a template.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

/// One captured line: which rank wrote it, to which stream, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLine {
    /// The rank that wrote it.
    pub rank: u32,
    /// Whether it went to standard error.
    pub stderr: bool,
    /// The text, without its newline.
    pub text: String,
}

/// A piece of a folded line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text every line of the group shares.
    Text(String),
    /// A number: each rank's, in the group's rank order.
    Number(Vec<String>),
}

/// Lines of several ranks folded into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldedLine {
    /// The ranks whose lines it holds, ascending.
    ranks: Vec<u32>,
    /// Whether the lines went to standard error.
    stderr: bool,
    /// The shared text and the numbers.
    pieces: Vec<Piece>,
}

/// Splits `text` into alternating text and number pieces (a number: digits, an optional
/// fraction, an optional exponent).
fn split_numbers(text: &str) -> Vec<(bool, &str)> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let (mut start, mut index) = (0, 0);
    while index < bytes.len() {
        if !bytes[index].is_ascii_digit() {
            index += 1;
            continue;
        }
        let number_start = index;
        let digits = |mut at: usize| {
            while at < bytes.len() && bytes[at].is_ascii_digit() {
                at += 1;
            }
            at
        };
        index = digits(index);
        if index + 1 < bytes.len() && bytes[index] == b'.' && bytes[index + 1].is_ascii_digit() {
            index = digits(index + 1);
        }
        if index + 1 < bytes.len() && matches!(bytes[index], b'e' | b'E') {
            let mut exponent = index + 1;
            if matches!(bytes[exponent], b'+' | b'-') {
                exponent += 1;
            }
            if exponent < bytes.len() && bytes[exponent].is_ascii_digit() {
                index = digits(exponent);
            }
        }
        if start < number_start {
            pieces.push((false, &text[start..number_start]));
        }
        pieces.push((true, &text[number_start..index]));
        start = index;
    }
    if start < bytes.len() {
        pieces.push((false, &text[start..]));
    }
    pieces
}

/// The template of `text`: its text pieces with a placeholder for each number.
fn template(text: &str) -> String {
    let mut template = String::with_capacity(text.len());
    for (number, piece) in split_numbers(text) {
        if number {
            template.push('\u{0}');
        } else {
            template.push_str(piece);
        }
    }
    template
}

/// Most groups of one template that lines may still join: a rank further behind than that
/// starts new groups (folding less, losing nothing), so that folding stays linear.
const MAX_OPEN_GROUPS: usize = 1024;

/// One group being folded.
struct Group {
    /// Its stream.
    stderr: bool,
    /// Its lines by rank.
    lines: Vec<(u32, String)>,
}

/// Folds lines as they come; [`Folder::finish`] returns the folded log.
#[derive(Default)]
pub struct Folder {
    /// Every group, in the order started.
    groups: Vec<Group>,
    /// By stream and template: the groups that some rank may still join, oldest first.
    open: HashMap<(bool, String), VecDeque<usize>>,
    /// Each rank's last group, by stream.
    last_group: HashMap<(u32, bool), usize>,
}

impl Folder {
    /// A folder with no lines yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next line of the log.
    pub fn push(&mut self, line: RankLine) {
        let after = self.last_group.get(&(line.rank, line.stderr)).copied();
        let candidates = self
            .open
            .entry((line.stderr, template(&line.text)))
            .or_default();
        // Every group of this rank (of this stream, as all of the template's are) is at or
        // before its last one, so the first candidate after that lacks this rank.
        let first = after.map_or(0, |after| {
            candidates.partition_point(|&group| group <= after)
        });
        let group = match candidates.get(first).copied() {
            Some(group) => {
                self.groups[group].lines.push((line.rank, line.text));
                group
            }
            None => {
                self.groups.push(Group {
                    stderr: line.stderr,
                    lines: vec![(line.rank, line.text)],
                });
                let group = self.groups.len() - 1;
                candidates.push_back(group);
                if candidates.len() > MAX_OPEN_GROUPS {
                    candidates.pop_front();
                }
                group
            }
        };
        self.last_group.insert((line.rank, line.stderr), group);
    }

    /// The folded log, in order.
    pub fn finish(self) -> Vec<FoldedLine> {
        self.groups.into_iter().map(fold_group).collect()
    }
}

/// Folds one group's lines (same stream, same template).
fn fold_group(mut group: Group) -> FoldedLine {
    group.lines.sort_by_key(|(rank, _)| *rank);
    let split: Vec<Vec<(bool, &str)>> = group
        .lines
        .iter()
        .map(|(_, text)| split_numbers(text))
        .collect();
    let pieces = (0..split[0].len())
        .map(|index| {
            let (number, first) = split[0][index];
            if !number {
                return Piece::Text(first.to_owned());
            }
            let values: Vec<&str> = split.iter().map(|pieces| pieces[index].1).collect();
            if values.iter().all(|value| *value == first) {
                Piece::Number(vec![first.to_owned()])
            } else {
                Piece::Number(values.into_iter().map(str::to_owned).collect())
            }
        })
        .collect();
    FoldedLine {
        ranks: group.lines.iter().map(|(rank, _)| *rank).collect(),
        stderr: group.stderr,
        pieces,
    }
}

/// `ranks` (ascending) as `0-3` or `0,2-3`.
fn rank_set(ranks: &[u32]) -> String {
    let mut text = String::new();
    let mut index = 0;
    while index < ranks.len() {
        let start = ranks[index];
        let mut end = start;
        while index + 1 < ranks.len() && ranks[index + 1] == end + 1 {
            index += 1;
            end += 1;
        }
        if !text.is_empty() {
            text.push(',');
        }
        if start == end {
            let _ = write!(text, "{start}");
        } else {
            let _ = write!(text, "{start}-{end}");
        }
        index += 1;
    }
    text
}

impl std::fmt::Display for FoldedLine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let marker = if self.stderr { "!" } else { "" };
        if let [rank] = self.ranks[..] {
            // One rank: exactly as `cohort logs` prints a line.
            write!(formatter, "[rank {rank}]{marker} ")?;
            for piece in &self.pieces {
                match piece {
                    Piece::Text(text) => formatter.write_str(text)?,
                    Piece::Number(values) => formatter.write_str(&values[0])?,
                }
            }
            return Ok(());
        }
        write!(formatter, "[ranks {}]{marker} ", rank_set(&self.ranks))?;
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => {
                    formatter.write_str(&text.replace('{', "{{").replace('}', "}}"))?
                }
                Piece::Number(values) if values.len() == 1 => formatter.write_str(&values[0])?,
                Piece::Number(values) => write!(formatter, "{{{}}}", values.join("|"))?,
            }
        }
        Ok(())
    }
}

/// Why a folded line does not read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("folded log line {line}: {problem}")]
pub struct UnfoldError {
    /// Which line (from 1).
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// Reads a folded log back into every rank's lines, each rank's lines of each stream in order
/// (other lines in the order of their folded lines).
pub fn unfold(folded: &str) -> Result<Vec<RankLine>, UnfoldError> {
    let mut lines = Vec::new();
    for (index, text) in folded.lines().enumerate() {
        let failure = |problem: &str| UnfoldError {
            line: index + 1,
            problem: problem.to_owned(),
        };
        let (head, rest) = text
            .split_once(']')
            .ok_or_else(|| failure("no rank prefix"))?;
        let (stderr, rest) = match rest.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let body = rest
            .strip_prefix(' ')
            .ok_or_else(|| failure("no space after the prefix"))?;
        if let Some(rank) = head.strip_prefix("[rank ") {
            let rank = rank.parse().map_err(|_| failure("bad rank"))?;
            lines.push(RankLine {
                rank,
                stderr,
                text: body.to_owned(),
            });
            continue;
        }
        let set = head
            .strip_prefix("[ranks ")
            .ok_or_else(|| failure("no rank prefix"))?;
        let ranks = parse_rank_set(set).ok_or_else(|| failure("bad rank set"))?;
        let texts = expand(body, ranks.len()).ok_or_else(|| failure("bad value list"))?;
        lines.extend(ranks.into_iter().zip(texts).map(|(rank, text)| RankLine {
            rank,
            stderr,
            text,
        }));
    }
    Ok(lines)
}

/// Parses `0-3` or `0,2-3`.
fn parse_rank_set(set: &str) -> Option<Vec<u32>> {
    let mut ranks = Vec::new();
    for part in set.split(',') {
        match part.split_once('-') {
            Some((start, end)) => ranks.extend(start.parse::<u32>().ok()?..=end.parse().ok()?),
            None => ranks.push(part.parse().ok()?),
        }
    }
    Some(ranks)
}

/// Each of `count` ranks' text of a folded body: doubled braces are literal, `{a|b|..}` holds
/// one value per rank.
fn expand(body: &str, count: usize) -> Option<Vec<String>> {
    let mut texts = vec![String::new(); count];
    let mut characters = body.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '{' if characters.peek() == Some(&'{') => {
                characters.next();
                texts.iter_mut().for_each(|text| text.push('{'));
            }
            '}' if characters.peek() == Some(&'}') => {
                characters.next();
                texts.iter_mut().for_each(|text| text.push('}'));
            }
            '{' => {
                let mut list = String::new();
                loop {
                    match characters.next()? {
                        '}' => break,
                        other => list.push(other),
                    }
                }
                let values: Vec<&str> = list.split('|').collect();
                if values.len() != count {
                    return None;
                }
                for (text, value) in texts.iter_mut().zip(values) {
                    text.push_str(value);
                }
            }
            '}' => return None,
            other => texts.iter_mut().for_each(|text| text.push(other)),
        }
    }
    Some(texts)
}

/// The lines of `lines` by rank and stream (`true`: standard error), each in order: what
/// folding keeps.
pub fn by_rank(lines: &[RankLine]) -> HashMap<(u32, bool), Vec<&str>> {
    let mut ranks: HashMap<(u32, bool), Vec<&str>> = HashMap::new();
    for line in lines {
        ranks
            .entry((line.rank, line.stderr))
            .or_default()
            .push(&line.text);
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(rank: u32, text: &str) -> RankLine {
        RankLine {
            rank,
            stderr: false,
            text: text.to_owned(),
        }
    }

    fn fold(lines: Vec<RankLine>) -> String {
        let mut folder = Folder::new();
        for line in lines {
            folder.push(line);
        }
        folder
            .finish()
            .iter()
            .map(|folded| format!("{folded}\n"))
            .collect()
    }

    #[test]
    fn lines_alike_across_ranks_fold_into_one_with_the_differing_numbers_listed() {
        let lines: Vec<RankLine> = (0..4)
            .flat_map(|rank| {
                [
                    line(rank, "starting"),
                    line(rank, &format!("step 10 loss 0.{}", 40 + rank)),
                ]
            })
            .collect();
        assert_eq!(
            fold(lines),
            "[ranks 0-3] starting\n[ranks 0-3] step 10 loss {0.40|0.41|0.42|0.43}\n"
        );
    }

    #[test]
    fn a_line_of_one_rank_prints_as_cohort_logs_prints_it_and_streams_do_not_mix() {
        let mut error = line(1, "failed {badly}");
        error.stderr = true;
        let folded = fold(vec![
            line(0, "eval accuracy 0.89"),
            line(1, "eval accuracy 0.89"),
            error,
            line(3, "done"),
            line(2, "done"),
        ]);
        assert_eq!(
            folded,
            "[ranks 0-1] eval accuracy 0.89\n[rank 1]! failed {badly}\n[ranks 2-3] done\n"
        );
    }

    #[test]
    fn a_rank_never_joins_a_group_before_its_previous_line() {
        // Rank 1 writes b before a; rank 0 a before b. Folding must not reorder rank 1.
        let lines = vec![line(0, "a"), line(0, "b"), line(1, "b"), line(1, "a")];
        let folded = fold(lines.clone());
        assert_eq!(folded, "[rank 0] a\n[ranks 0-1] b\n[rank 1] a\n");
        assert_eq!(
            by_rank(&unfold(&folded).unwrap()),
            by_rank(&lines),
            "{folded}"
        );
    }

    #[test]
    fn a_rank_whose_standard_error_arrived_first_still_folds_its_output() {
        let mut warning = line(1, "warning");
        warning.stderr = true;
        let folded = fold(vec![
            line(0, "start"),
            line(0, "done"),
            warning,
            line(1, "start"),
            line(1, "done"),
        ]);
        assert_eq!(
            folded,
            "[ranks 0-1] start\n[ranks 0-1] done\n[rank 1]! warning\n"
        );
    }

    #[test]
    fn rank_sets_print_as_ranges() {
        assert_eq!(rank_set(&[0, 1, 2, 3]), "0-3");
        assert_eq!(rank_set(&[0, 2, 3, 7]), "0,2-3,7");
        assert_eq!(parse_rank_set("0,2-3,7").unwrap(), [0, 2, 3, 7]);
    }

    #[test]
    fn numbers_are_digits_with_an_optional_fraction_and_exponent() {
        assert_eq!(
            split_numbers("lr 1.5e-3 at 12, v2.0x"),
            [
                (false, "lr "),
                (true, "1.5e-3"),
                (false, " at "),
                (true, "12"),
                (false, ", v"),
                (true, "2.0"),
                (false, "x")
            ]
        );
        assert_eq!(template("step 7 of 9."), "step \u{0} of \u{0}.");
    }

    fn arbitrary_lines() -> impl Strategy<Value = Vec<RankLine>> {
        let text = prop::sample::select(vec![
            "step 1 loss 0.5",
            "step 2 loss 0.25",
            "{json: 1}",
            "epoch 3",
            "a|b {x}",
            "done",
            "",
            "}}{{ 12e",
        ]);
        prop::collection::vec((0u32..5, any::<bool>(), text, 0u32..100), 0..60).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(rank, stderr, text, number)| RankLine {
                    rank,
                    stderr,
                    text: text.replace('1', &number.to_string()),
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn folding_loses_nothing(lines in arbitrary_lines()) {
            let folded = fold(lines.clone());
            let unfolded = unfold(&folded).unwrap();
            prop_assert_eq!(by_rank(&unfolded), by_rank(&lines), "{}", folded);
            prop_assert!(folded.lines().count() <= lines.len());
        }
    }
}
