//! GPT-2 style byte-level BPE, read from the GGUF metadata (`tokenizer.ggml.tokens`,
//! `tokenizer.ggml.merges`, `tokenizer.ggml.token_type`).
//!
//! Encoding runs in three steps, as the Hugging Face tokenizer SmolLM2 ships with:
//! 1. control tokens (`<|im_start|>`, `<|im_end|>`, ...: token type 3) are cut out of the text
//!    verbatim;
//! 2. pre-tokenization: every numeric character is its own piece (the `Digits` pre-tokenizer),
//!    then the GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
//!    \s+(?!\S)|\s+` splits the rest (hand-written below: no regex engine needed);
//! 3. each piece's UTF-8 bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`)
//!    and merged by BPE, lowest merge rank first.
//!
//! Decoding maps token strings back through the byte table.

use crate::ModelError;
use std::collections::HashMap;

/// Byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    /// Control tokens, longest first, matched verbatim in the input.
    specials: Vec<(String, u32)>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// GPT-2's reversible byte -> printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

impl Tokenizer {
    /// Builds the tokenizer from the GGUF vocabulary, merges ("a b" strings) and token types.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        token_types: Option<Vec<i32>>,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Tokenizer, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Format("empty tokenizer vocabulary".into()));
        }
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (r, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| ModelError::Format(format!("merge {r} has no space: {m:?}")))?;
            ranks.insert((a.to_string(), b.to_string()), r as u32);
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| match &token_types {
                Some(tt) => tt.get(*i) == Some(&3),
                None => t.starts_with("<|") && t.ends_with("|>"),
            })
            .filter(|(_, t)| !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let byte_char = bytes_to_unicode();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Tokenizer {
            tokens,
            vocab,
            ranks,
            specials,
            byte_char,
            char_byte,
            bos,
            eos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token string (for example `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Encodes `text` (control tokens in it are recognized).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest control token, longest on ties.
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
            let (plain, next) = match hit {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    ("", &rest[at + len..])
                }
                None => (rest, ""),
            };
            self.encode_plain(plain, &mut out);
            rest = next;
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pre_tokenize(text) {
            let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
            self.bpe(&mapped, out);
        }
    }

    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(&id) = self.vocab.get(word) {
            out.push(id);
            return;
        }
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        while parts.len() > 1 {
            let best = (0..parts.len() - 1)
                .filter_map(|i| {
                    self.ranks
                        .get(&(parts[i].clone(), parts[i + 1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
        for p in parts {
            match self.vocab.get(&p) {
                Some(&id) => out.push(id),
                // Every single byte character is in a byte-level vocabulary; skip defensively.
                None => {
                    for c in p.chars() {
                        if let Some(&id) = self.vocab.get(&c.to_string()) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD); unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.specials.iter().any(|(_, s)| *s == id) {
                bytes.extend_from_slice(t.as_bytes());
                continue;
            }
            for c in t.chars() {
                match self.char_byte.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => bytes.extend_from_slice(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Digits one by one, then the GPT-2 split pattern on what lies between them.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut seg_start = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            gpt2_split(&text[seg_start..i], &mut pieces);
            pieces.push(&text[i..i + c.len_utf8()]);
            seg_start = i + c.len_utf8();
        }
    }
    gpt2_split(&text[seg_start..], &mut pieces);
    pieces
}

fn gpt2_split<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |k: usize| if k < n { chars[k].0 } else { s.len() };
    let run = |from: usize, cl: Class| {
        let mut k = from;
        while k < n && class(chars[k].1) == cl {
            k += 1;
        }
        k
    };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions: 's 't 're 've 'm 'll 'd
        if c == '\'' {
            let rest = &s[at(i + 1)..];
            if let Some(len) = ["s", "t", "re", "ve", "m", "ll", "d"]
                .iter()
                .find(|p| rest.starts_with(**p))
                .map(|p| p.len())
            {
                let end = at(i + 1) + len;
                out.push(&s[at(i)..end]);
                while i < n && chars[i].0 < end {
                    i += 1;
                }
                continue;
            }
        }
        // ` ?X+` for letters, numbers and other symbols.
        let (lead, first) = if c == ' ' && i + 1 < n && class(chars[i + 1].1) != Class::Space {
            (1, class(chars[i + 1].1))
        } else {
            (0, class(c))
        };
        if first != Class::Space {
            let end = run(i + lead, first);
            out.push(&s[at(i)..at(end)]);
            i = end;
            continue;
        }
        // Whitespace: `\s+(?!\S)` then `\s+`.
        let end = run(i, Class::Space);
        let take = if end < n && end - i > 1 { end - 1 } else { end };
        out.push(&s[at(i)..at(take)]);
        i = take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `\s+(?!\S)` leaves the last whitespace before a word to `\s+`: "\n\nbye" is
    /// "\n", "\n", "bye", as GPT-2 (198, 198) does.
    #[test]
    fn splits_like_gpt2_with_single_digits() {
        assert_eq!(
            pre_tokenize("Hello world, it's 2024!  ok\n\nbye "),
            vec![
                "Hello", " world", ",", " it", "'s", " ", "2", "0", "2", "4", "!", " ", " ok",
                "\n", "\n", "bye", " "
            ]
        );
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn bpe_round_trips_with_a_tiny_vocabulary() {
        let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        tokens.extend(["he", "ll", "hell", "hello", "<|end|>"].map(String::from));
        let merges = ["h e", "l l", "he ll", "hell o"].map(String::from);
        let mut types = vec![1; tokens.len()];
        *types.last_mut().unwrap() = 3;
        let t = Tokenizer::new(tokens, &merges, Some(types), None, None).unwrap();
        let ids = t.encode("hello<|end|>hel");
        assert_eq!(ids[0], t.token_id("hello").unwrap());
        assert_eq!(ids[1], t.token_id("<|end|>").unwrap());
        assert_eq!(t.decode(&ids), "hello<|end|>hel");
        assert!(Tokenizer::new(vec!["a".into()], &["ab".into()], None, None, None).is_err());
    }
}
