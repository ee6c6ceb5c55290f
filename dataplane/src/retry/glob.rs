//! Shell globs with exactly Python's `fnmatch.fnmatchcase` semantics (what
//! the sidecar's `RetryPolicy.is_idempotent` matched with): `*` any run,
//! `/` included; `?` one character; `[seq]` and `[!seq]` sets with ranges;
//! an unclosed `[` is literal; case-sensitive; the whole name must match.
//!
//! A set is translated the way `fnmatch.translate` (Python 3.11) rewrites it
//! into a regex class, then read the way `re` reads that class: the odd
//! corners (empty ranges dropped with their ends, a trailing `-` literal, a
//! set that became empty never matching) come out as in Python.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobError {
    /// A set range whose end comes before its start (Python's `re` would
    /// refuse it; translate never produces one, so this means a bug here).
    BadRange { pattern: String, lo: char, hi: char },
    /// A set ending in a lone backslash (likewise never produced).
    BadEscape { pattern: String },
}

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobError::BadRange { pattern, lo, hi } => {
                write!(f, "glob {pattern:?}: bad character range {lo}-{hi}")
            }
            GlobError::BadEscape { pattern } => write!(f, "glob {pattern:?}: bad escape"),
        }
    }
}

impl std::error::Error for GlobError {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`, or a negated empty set: any one character.
    Any,
    /// One or more `*` in a row.
    Star,
    Set {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// A set left empty: matches nothing (`(?!)`).
    Never,
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Char(want) => *want == c,
            Token::Any => true,
            Token::Star | Token::Never => false,
            Token::Set { negated, ranges } => {
                *negated != ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    tokens: Vec<Token>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let pat: Vec<char> = pattern.chars().collect();
        let n = pat.len();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < n {
            let c = pat[i];
            i += 1;
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::Any),
                '[' => {
                    let mut j = i;
                    if j < n && pat[j] == '!' {
                        j += 1;
                    }
                    if j < n && pat[j] == ']' {
                        j += 1;
                    }
                    while j < n && pat[j] != ']' {
                        j += 1;
                    }
                    if j >= n {
                        tokens.push(Token::Char('['));
                    } else {
                        tokens.push(set_token(pattern, &pat, i, j)?);
                        i = j + 1;
                    }
                }
                c => tokens.push(Token::Char(c)),
            }
        }
        Ok(Glob {
            pattern: pattern.to_owned(),
            tokens,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Does the whole of `name` match? Greedy with one backtrack point (the
    /// last `*`), which is exact for globs: every other token is one character.
    pub fn matches(&self, name: &str) -> bool {
        let tokens = &self.tokens;
        let (mut t, mut at) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while let Some(c) = name[at..].chars().next() {
            match tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t, at));
                    t += 1;
                }
                Some(token) if token.matches(c) => {
                    t += 1;
                    at += c.len_utf8();
                }
                _ => match star {
                    Some((st, from)) => {
                        // The last star takes one more character; retry after it.
                        let Some(taken) = name[from..].chars().next() else {
                            return false;
                        };
                        let from = from + taken.len_utf8();
                        star = Some((st, from));
                        t = st + 1;
                        at = from;
                    }
                    None => return false,
                },
            }
        }
        tokens[t..].iter().all(|token| *token == Token::Star)
    }
}

fn find_dash(pat: &[char], from: usize, to: usize) -> Option<usize> {
    if from >= to {
        return None;
    }
    pat[from..to]
        .iter()
        .position(|&c| c == '-')
        .map(|k| from + k)
}

/// `fnmatch.translate`'s handling of `pat[i..j]`, the inside of a `[...]`.
fn set_token(pattern: &str, pat: &[char], mut i: usize, j: usize) -> Result<Token, GlobError> {
    let inside = &pat[i..j];
    let mut stuff: Vec<char> = Vec::new();
    if !inside.contains(&'-') {
        escape_into(&mut stuff, inside);
    } else {
        let mut chunks: Vec<Vec<char>> = Vec::new();
        let mut k = if pat[i] == '!' { i + 2 } else { i + 1 };
        while let Some(dash) = find_dash(pat, k, j) {
            chunks.push(pat[i..dash].to_vec());
            i = dash + 1;
            k = dash + 3;
        }
        let last = &pat[i..j];
        if !last.is_empty() {
            chunks.push(last.to_vec());
        } else if let Some(prev) = chunks.last_mut() {
            prev.push('-');
        }
        // Remove empty ranges -- invalid in RE (translate's words).
        for k in (1..chunks.len()).rev() {
            if let (Some(&end), Some(&start)) = (chunks[k - 1].last(), chunks[k].first()) {
                if end > start {
                    let tail: Vec<char> = chunks[k][1..].to_vec();
                    chunks[k - 1].pop();
                    chunks[k - 1].extend(tail);
                    chunks.remove(k);
                }
            }
        }
        for (n, chunk) in chunks.iter().enumerate() {
            if n > 0 {
                stuff.push('-'); // a range: not escaped
            }
            escape_into(&mut stuff, chunk);
        }
    }
    if stuff.is_empty() {
        return Ok(Token::Never);
    }
    if stuff == ['!'] {
        return Ok(Token::Any);
    }
    let negated = stuff[0] == '!';
    let class = if negated { &stuff[1..] } else { &stuff[..] };
    // A leading `^` or `[` is escaped by translate; escape_into already
    // made every other character literal, so neither needs doing here.
    let ranges = parse_class(pattern, class)?;
    Ok(Token::Set { negated, ranges })
}

/// translate's escaping: backslashes, hyphens, and `&~|` made literal.
fn escape_into(out: &mut Vec<char>, chunk: &[char]) {
    for &c in chunk {
        if matches!(c, '\\' | '-' | '&' | '~' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `re`'s reading of a class body: `\x` is the literal `x`, `a-b` a range
/// (only unescaped hyphens form one), a hyphen at the very end literal.
fn parse_class(pattern: &str, class: &[char]) -> Result<Vec<(char, char)>, GlobError> {
    let literal = |p: &mut usize| -> Result<char, GlobError> {
        let c = class[*p];
        *p += 1;
        if c != '\\' {
            return Ok(c);
        }
        let escaped = class.get(*p).copied().ok_or_else(|| GlobError::BadEscape {
            pattern: pattern.to_owned(),
        })?;
        *p += 1;
        Ok(escaped)
    };
    let mut ranges = Vec::new();
    let mut p = 0;
    while p < class.len() {
        // A `]` can only come first here (translate cut the set at the
        // first other one), where `re` takes it literally.
        let lo = literal(&mut p)?;
        if class.get(p) != Some(&'-') {
            ranges.push((lo, lo));
            continue;
        }
        p += 1;
        if p >= class.len() {
            ranges.push((lo, lo));
            ranges.push(('-', '-'));
            break;
        }
        let hi = literal(&mut p)?;
        if hi < lo {
            return Err(GlobError::BadRange {
                pattern: pattern.to_owned(),
                lo,
                hi,
            });
        }
        ranges.push((lo, hi));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn glob(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn answers_as_python_on_every_fixture_case() {
        // tests/data/fnmatch.json: written by tests/gen_fnmatch_fixture.py from
        // the sidecar's own RetryPolicy.is_idempotent.
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/fnmatch.json")).unwrap();
        let names: Vec<&str> = fixture["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 700);
        for case in cases {
            let pattern = case[0].as_str().unwrap();
            let expected: Vec<usize> = case[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect();
            let g = glob(pattern);
            let got: Vec<usize> = (0..names.len()).filter(|&i| g.matches(names[i])).collect();
            assert_eq!(got, expected, "pattern {pattern:?}");
        }
    }

    #[test]
    fn stars_cross_slashes_and_the_whole_name_must_match() {
        let g = glob("/shop.Catalog/*");
        assert!(g.matches("/shop.Catalog/List"));
        assert!(g.matches("/shop.Catalog/"));
        assert!(g.matches("/shop.Catalog/a/b"));
        assert!(!g.matches("/shop.CatalogAdmin/Drop"));
        assert!(!g.matches("x/shop.Catalog/List"));
        assert!(glob("*Get*").matches("/a.B/GetThing"));
        assert!(!glob("/a.B/Get").matches("/a.B/GetThing"));
        assert!(glob("*").matches(""));
        assert!(glob("").matches(""));
        assert!(!glob("").matches("a"));
        assert!(glob("a*b*c").matches("aXbYbZc"));
        assert!(!glob("a*b*c").matches("aXbYbZ"));
    }

    #[test]
    fn question_marks_take_one_character_even_a_newline_or_a_wide_one() {
        assert!(glob("a?c").matches("abc"));
        assert!(glob("a?c").matches("a\nc"));
        assert!(glob("a?c").matches("a键c"));
        assert!(!glob("a?c").matches("ac"));
        assert!(glob("*键").matches("ключ键"));
        assert!(glob("[!a]").matches("ж"));
        assert!(glob("[а-я]").matches("ж"));
    }

    #[test]
    fn matching_is_case_sensitive() {
        assert!(!glob("/Shop.*").matches("/shop.Catalog/List"));
        assert!(!glob("[A-Z]").matches("a"));
    }

    #[test]
    fn the_odd_corners_of_sets_follow_translate() {
        assert!(glob("[").matches("["), "an unclosed bracket is literal");
        assert!(glob("[ab").matches("[ab"));
        assert!(glob("[]]").matches("]"));
        assert!(glob("[!]]").matches("a") && !glob("[!]]").matches("]"));
        assert!(glob("[a-]").matches("-") && glob("[a-]").matches("a"));
        assert!(!glob("[z-a]").matches("z") && !glob("[z-a]").matches("-"));
        assert!(
            glob("[!z-a]").matches("q"),
            "a negated empty set is any character"
        );
        assert!(glob("[a--c]").matches("c") && !glob("[a--c]").matches("a"));
        // An empty first range drops its ends, and the `!` it exposes negates.
        assert!(glob("[z-a!b]").matches("q") && !glob("[z-a!b]").matches("b"));
        assert!(glob("[\\]").matches("\\"));
        assert!(glob("[^a]").matches("^") && !glob("[^a]").matches("b"));
        assert!(glob("[*]").matches("*") && !glob("[*]").matches("x"));
    }

    #[test]
    fn errors_say_which_glob() {
        let e = GlobError::BadRange {
            pattern: "[b-a]".into(),
            lo: 'b',
            hi: 'a',
        };
        assert!(e.to_string().contains("[b-a]"));
        assert!(GlobError::BadEscape {
            pattern: "x".into()
        }
        .to_string()
        .contains("escape"));
    }

    proptest! {
        #[test]
        fn any_pattern_compiles_and_matching_never_panics(
            pattern in "[ab\\-!\\]\\^\\[\\\\*?&|é键]{0,12}",
            name in "[ab\\-!\\]\\^\\[\\\\&é键]{0,12}",
        ) {
            let g = Glob::new(&pattern);
            prop_assert!(g.is_ok(), "{:?}", g);
            let _ = g.unwrap().matches(&name);
        }

        #[test]
        fn a_literal_pattern_matches_only_itself(s in "[a-zA-Z0-9/._]{0,20}", t in "[a-zA-Z0-9/._]{0,20}") {
            let g = glob(&s);
            prop_assert!(g.matches(&s));
            prop_assert_eq!(g.matches(&t), s == t);
        }

        #[test]
        fn a_prefix_star_matches_every_extension(s in "[a-z/.]{0,10}", tail in ".{0,10}") {
            let (pattern, name) = (format!("{s}*"), format!("{s}{tail}"));
            prop_assert!(glob(&pattern).matches(&name));
        }
    }
}
