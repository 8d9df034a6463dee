//! Client subcommands: each makes one call and prints a readable answer. Errors print the gRPC
//! code, the stable reason and the message, and exit 1.

use crate::domain::Money;
use crate::rpc::pb::{self, *};
use clap::{Args, Subcommand, ValueEnum};
use std::process::ExitCode;
use tonic::transport::Channel;
use tonic::Request;

#[derive(Debug, Args)]
pub struct Connection {
    /// The gateway's address.
    #[arg(long, env = "YIBAO_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    server: String,
    /// Your API key (institution, service or operator).
    #[arg(long, env = "YIBAO_API_KEY", global = true, hide_env_values = true)]
    key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Pay a patient's share from personal accounts (or plan it with --dry-run).
    Settle(SettleArgs),
    /// Refund all or part of a settlement, back the way it came.
    Refund {
        #[arg(long)]
        setl_id: String,
        /// Default: everything still refundable.
        #[arg(long)]
        amount: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Reverse (冲正) a settlement by its original request id.
    Reverse {
        #[arg(long)]
        original_request_id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one settlement.
    Settlement {
        #[arg(long, conflicts_with = "request_id")]
        setl_id: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// A person's balance.
    Balance {
        #[arg(long)]
        psn_no: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// A person's account entries, newest first.
    Entries {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[arg(long)]
        page_token: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Family accounts (家庭共济).
    #[command(subcommand)]
    Family(FamilyCommand),
    /// Payment PIN.
    #[command(subcommand)]
    Pin(PinCommand),
    /// No-PIN tiers (限额免密).
    #[command(subcommand)]
    Tier(TierCommand),
    /// Social security card loss (挂失).
    #[command(subcommand)]
    Card(CardCommand),
    /// Operator work.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChannelArg {
    Card,
    EVoucher,
    Registration,
    CrossRegion,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CategoryArg {
    Outpatient,
    Inpatient,
    Pharmacy,
    Registration,
    Premium,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Partial,
    FullOnly,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RelationArg {
    Spouse,
    Parent,
    Child,
    Sibling,
    Grandparent,
    Grandchild,
}

#[derive(Debug, Args)]
pub struct SettleArgs {
    #[arg(long)]
    psn_no: String,
    #[arg(long)]
    amount: String,
    #[arg(long, value_enum)]
    channel: ChannelArg,
    #[arg(long, value_enum)]
    category: CategoryArg,
    #[arg(long, value_enum, default_value = "partial")]
    mode: ModeArg,
    /// Do not draw on family accounts.
    #[arg(long)]
    self_only: bool,
    /// The payer's 6-digit PIN (or YIBAO_PIN).
    #[arg(long, env = "YIBAO_PIN", hide_env_values = true)]
    pin: Option<String>,
    #[arg(long, default_value = "")]
    mdtrt_id: String,
    #[arg(long, default_value = "")]
    ec_token: String,
    #[arg(long, default_value = "")]
    beneficiary_psn_no: String,
    /// Default: a fresh one.
    #[arg(long)]
    request_id: Option<String>,
    /// PreSettle: show the plan and whether a PIN is needed, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
pub enum FamilyCommand {
    /// Who this person shares with, and whose accounts they may use.
    List {
        #[arg(long)]
        psn_no: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// The owner registers a member who may draw on the owner's account.
    Register {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        member: String,
        /// What the member is to the owner.
        #[arg(long, value_enum)]
        relation: RelationArg,
        #[command(flatten)]
        connection: Connection,
    },
    Revoke {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        member: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// The member's deduction order over the owners' accounts.
    Order {
        #[arg(long)]
        member: String,
        owners: Vec<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum PinCommand {
    Set {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        new_pin: String,
        #[command(flatten)]
        connection: Connection,
    },
    Change {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        current_pin: String,
        #[arg(long)]
        new_pin: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum TierCommand {
    List {
        #[arg(long)]
        psn_no: String,
        #[command(flatten)]
        connection: Connection,
    },
    Set {
        #[arg(long)]
        psn_no: String,
        /// A tier name, or NONE.
        #[arg(long)]
        tier: String,
        #[arg(long, default_value = "")]
        pin: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum CardCommand {
    Lost {
        #[arg(long)]
        psn_no: String,
        #[command(flatten)]
        connection: Connection,
    },
    Restore {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        pin: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PersonCategoryArg {
    Employee,
    Retiree,
    Flexible,
    Resident,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Active,
    Suspended,
    Removed,
    Terminated,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    Hospital,
    Pharmacy,
    CrossRegionPlatform,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Service,
    Operator,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Bulk import of people, opening balances and family links from CSV, straight into the ledger
    /// (a region moving from a legacy system); row by row, re-runnable. Exit 1 if rows were refused.
    Import(super::import::ImportArgs),
    /// Contributions: `import FILE.csv` straight into the ledger.
    #[command(subcommand)]
    Contributions(super::import::ContributionsCommand),
    /// The interest run of a region for the period ending --as-of (a settlement date that is over),
    /// in steps with progress, and a summary at the end. Re-runnable: nothing is paid twice.
    Interest {
        #[arg(long)]
        region: String,
        /// The period's last day, YYYY-MM-DD (Beijing: a quarter end; Jilin: 31 December).
        #[arg(long)]
        as_of: String,
        #[arg(long, default_value_t = 50_000)]
        step: u64,
        #[arg(long, default_value = "")]
        resume_after: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Transfer the whole balance out to another region and close the account (interest up to the
    /// day before is paid first).
    TransferOut {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        to_region: String,
        /// Default: a fresh one (give the same id to retry safely).
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Merge money transferred in from another region into the person's account (opened if need be).
    TransferIn {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        from_region: String,
        #[arg(long)]
        amount: String,
        /// From when the money counts for interest, YYYY-MM-DD (default: today).
        #[arg(long, default_value = "")]
        value_date: String,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// After termination: pay the whole balance out once (清算) and close the account.
    Liquidate {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// The monthly crediting run (划入) of a region for a month that is over, in steps of
    /// --step accounts with progress after each, and a summary at the end. Re-runnable: nothing
    /// is credited twice.
    Credit {
        /// Region code, e.g. 110000.
        #[arg(long)]
        region: String,
        /// The month credited, YYYY-MM.
        #[arg(long)]
        period: String,
        /// Accounts per call.
        #[arg(long, default_value_t = 50_000)]
        step: u64,
        /// Resume after this person (printed by an interrupted run).
        #[arg(long, default_value = "")]
        resume_after: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Create or update a person (opens the account when the region's policy says so).
    Person {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        birth_date: String,
        #[arg(long)]
        region: String,
        #[arg(long, value_enum)]
        category: PersonCategoryArg,
        #[arg(long, value_enum, default_value = "active")]
        status: StatusArg,
        #[command(flatten)]
        connection: Connection,
    },
    /// Register an institution; prints its API key once.
    Institution {
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        #[arg(long)]
        region: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Issue a SERVICE or OPERATOR key; prints it once.
    Key {
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long)]
        label: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// An audited manual correction.
    Adjust {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        amount: String,
        /// credit or debit
        #[arg(long)]
        direction: String,
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        value_date: String,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    ResetPin {
        #[arg(long)]
        psn_no: String,
        #[arg(long)]
        new_pin: String,
        #[command(flatten)]
        connection: Connection,
    },
    Freeze {
        #[arg(long)]
        psn_no: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        connection: Connection,
    },
    Unfreeze {
        #[arg(long)]
        psn_no: String,
        #[command(flatten)]
        connection: Connection,
    },
}

type CallResult = Result<(), tonic::Status>;

struct Client {
    channel: Channel,
    key: Option<String>,
}

impl Client {
    async fn connect(connection: &Connection) -> Result<Client, String> {
        let channel = Channel::from_shared(connection.server.clone())
            .map_err(|e| format!("bad --server {}: {e}", connection.server))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", connection.server))?;
        Ok(Client { channel, key: connection.key.clone() })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(key) = &self.key {
            if let Ok(value) = format!("Bearer {key}").parse() {
                request.metadata_mut().insert("authorization", value);
            }
        }
        request
    }

    fn settlement(&self) -> settlement_service_client::SettlementServiceClient<Channel> {
        settlement_service_client::SettlementServiceClient::new(self.channel.clone())
    }
    fn account(&self) -> account_service_client::AccountServiceClient<Channel> {
        account_service_client::AccountServiceClient::new(self.channel.clone())
    }
    fn admin(&self) -> admin_service_client::AdminServiceClient<Channel> {
        admin_service_client::AdminServiceClient::new(self.channel.clone())
    }
}

fn fresh_request_id(prefix: &str) -> String {
    format!("{prefix}-{}", chrono::Utc::now().format("%Y%m%d%H%M%S%6f"))
}

fn connection_of(command: &ClientCommand) -> Option<&Connection> {
    Some(match command {
        ClientCommand::Settle(args) => &args.connection,
        ClientCommand::Refund { connection, .. }
        | ClientCommand::Reverse { connection, .. }
        | ClientCommand::Settlement { connection, .. }
        | ClientCommand::Balance { connection, .. }
        | ClientCommand::Entries { connection, .. } => connection,
        ClientCommand::Family(
            FamilyCommand::List { connection, .. }
            | FamilyCommand::Register { connection, .. }
            | FamilyCommand::Revoke { connection, .. }
            | FamilyCommand::Order { connection, .. },
        ) => connection,
        ClientCommand::Pin(PinCommand::Set { connection, .. } | PinCommand::Change { connection, .. }) => connection,
        ClientCommand::Tier(TierCommand::List { connection, .. } | TierCommand::Set { connection, .. }) => connection,
        ClientCommand::Card(CardCommand::Lost { connection, .. } | CardCommand::Restore { connection, .. }) => {
            connection
        }
        ClientCommand::Admin(
            AdminCommand::Person { connection, .. }
            | AdminCommand::Institution { connection, .. }
            | AdminCommand::Key { connection, .. }
            | AdminCommand::Adjust { connection, .. }
            | AdminCommand::Credit { connection, .. }
            | AdminCommand::Interest { connection, .. }
            | AdminCommand::TransferOut { connection, .. }
            | AdminCommand::TransferIn { connection, .. }
            | AdminCommand::Liquidate { connection, .. }
            | AdminCommand::ResetPin { connection, .. }
            | AdminCommand::Freeze { connection, .. }
            | AdminCommand::Unfreeze { connection, .. },
        ) => connection,
        ClientCommand::Admin(AdminCommand::Import(_) | AdminCommand::Contributions(_)) => return None,
    })
}

pub async fn run(command: ClientCommand) -> ExitCode {
    let Some(connection) = connection_of(&command) else {
        return match command {
            ClientCommand::Admin(AdminCommand::Import(args)) => super::import::run(args).await,
            ClientCommand::Admin(AdminCommand::Contributions(command)) => {
                super::import::run_contributions(command).await
            }
            _ => unreachable!("only the imports have no connection"),
        };
    };
    let client = match Client::connect(connection).await {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    match call(&client, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => {
            let reason = tonic_types::StatusExt::get_error_details(&status)
                .error_info()
                .map(|info| info.reason.clone())
                .unwrap_or_default();
            eprintln!("error: {:?} {reason}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}

async fn call(client: &Client, command: ClientCommand) -> CallResult {
    match command {
        ClientCommand::Settle(args) => {
            let request = pb::SettleRequest {
                request_id: args.request_id.unwrap_or_else(|| fresh_request_id("cli")),
                psn_no: args.psn_no,
                amount: args.amount,
                channel: match args.channel {
                    ChannelArg::Card => pb::Channel::Card,
                    ChannelArg::EVoucher => pb::Channel::EVoucher,
                    ChannelArg::Registration => pb::Channel::Registration,
                    ChannelArg::CrossRegion => pb::Channel::CrossRegion,
                } as i32,
                category: match args.category {
                    CategoryArg::Outpatient => pb::Category::Outpatient,
                    CategoryArg::Inpatient => pb::Category::Inpatient,
                    CategoryArg::Pharmacy => pb::Category::Pharmacy,
                    CategoryArg::Registration => pb::Category::Registration,
                    CategoryArg::Premium => pb::Category::Premium,
                } as i32,
                mode: match args.mode {
                    ModeArg::Partial => pb::PayMode::Partial,
                    ModeArg::FullOnly => pb::PayMode::FullOnly,
                } as i32,
                self_only: args.self_only,
                pin: args.pin.unwrap_or_default(),
                mdtrt_id: args.mdtrt_id,
                ec_token: args.ec_token,
                beneficiary_psn_no: args.beneficiary_psn_no,
            };
            let answer = if args.dry_run {
                client.settlement().pre_settle(client.request(request)).await?
            } else {
                client.settlement().settle(client.request(request)).await?
            };
            print_settlement(answer.get_ref());
        }
        ClientCommand::Refund { setl_id, amount, request_id, .. } => {
            let request = pb::RefundRequest {
                request_id: request_id.unwrap_or_else(|| fresh_request_id("cli-refund")),
                setl_id,
                amount: amount.unwrap_or_default(),
            };
            let refund = client.settlement().refund(client.request(request)).await?.into_inner();
            println!("refund      {}  of {}  amount {}", refund.refund_id, refund.setl_id, refund.amount);
            for credit in &refund.credits {
                println!(
                    "  back to   {}{}  {}",
                    credit.owner_psn_no,
                    if credit.family { " (family)" } else { "" },
                    credit.amount
                );
            }
            println!(
                "settlement  {:?}  refunded {}  still refundable {}",
                pb::SettlementStatus::try_from(refund.settlement_status).unwrap_or_default(),
                refund.refunded_total,
                refund.refundable_amount
            );
        }
        ClientCommand::Reverse { original_request_id, .. } => {
            let answer =
                client.settlement().reverse(client.request(pb::ReverseRequest { original_request_id })).await?;
            print_settlement(answer.get_ref());
        }
        ClientCommand::Settlement { setl_id, request_id, .. } => {
            let key = match (setl_id, request_id) {
                (Some(id), _) => Some(pb::get_settlement_request::Key::SetlId(id)),
                (None, Some(id)) => Some(pb::get_settlement_request::Key::RequestId(id)),
                (None, None) => None,
            };
            let answer = client.settlement().get_settlement(client.request(pb::GetSettlementRequest { key })).await?;
            print_settlement(answer.get_ref());
        }
        ClientCommand::Balance { psn_no, .. } => {
            let balance = client.account().get_balance(client.request(pb::GetBalanceRequest { psn_no })).await?;
            print_balance(balance.get_ref());
        }
        ClientCommand::Entries { psn_no, from, to, page_size, page_token, .. } => {
            let request = pb::ListEntriesRequest {
                psn_no,
                from_date: from.unwrap_or_default(),
                to_date: to.unwrap_or_default(),
                page_size,
                page_token: page_token.unwrap_or_default(),
            };
            let page = client.account().list_entries(client.request(request)).await?.into_inner();
            println!(
                "{:>8}  {:<19}  {:<18}  {:>10}  {:>10}  {:<10}  counterparty / settlement",
                "entry", "at (UTC)", "kind", "amount", "balance", "value date"
            );
            for entry in &page.entries {
                let at = entry
                    .at
                    .as_ref()
                    .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                let kind = pb::EntryKind::try_from(entry.kind)
                    .unwrap_or_default()
                    .as_str_name()
                    .trim_start_matches("ENTRY_KIND_")
                    .to_string();
                println!(
                    "{:>8}  {:<19}  {:<18}  {:>10}  {:>10}  {:<10}  {} {}",
                    entry.entry_id,
                    at,
                    kind,
                    entry.amount,
                    entry.balance_after,
                    entry.value_date,
                    entry.counterparty,
                    entry.setl_id
                );
            }
            if !page.next_page_token.is_empty() {
                println!("more: --page-token {}", page.next_page_token);
            }
        }
        ClientCommand::Family(command) => family(client, command).await?,
        ClientCommand::Pin(PinCommand::Set { psn_no, new_pin, .. }) => {
            client.account().set_pin(client.request(pb::SetPinRequest { psn_no, new_pin })).await?;
            println!("PIN set");
        }
        ClientCommand::Pin(PinCommand::Change { psn_no, current_pin, new_pin, .. }) => {
            client.account().change_pin(client.request(pb::ChangePinRequest { psn_no, current_pin, new_pin })).await?;
            println!("PIN changed");
        }
        ClientCommand::Tier(TierCommand::List { psn_no, .. }) => {
            let tiers = client
                .account()
                .list_no_pin_tiers(client.request(pb::ListNoPinTiersRequest { psn_no }))
                .await?
                .into_inner();
            println!("{:<8} {:>14} {:>10}", "tier", "per payment", "per day");
            for tier in &tiers.tiers {
                println!("{:<8} {:>14} {:>10}", tier.name, tier.per_payment_max, tier.daily_max);
            }
            println!("current: {}", tiers.current);
        }
        ClientCommand::Tier(TierCommand::Set { psn_no, tier, pin, .. }) => {
            let balance =
                client.account().set_no_pin_tier(client.request(pb::SetNoPinTierRequest { psn_no, pin, tier })).await?;
            print_balance(balance.get_ref());
        }
        ClientCommand::Card(CardCommand::Lost { psn_no, .. }) => {
            let balance =
                client.account().report_card_loss(client.request(pb::ReportCardLossRequest { psn_no })).await?;
            print_balance(balance.get_ref());
        }
        ClientCommand::Card(CardCommand::Restore { psn_no, pin, .. }) => {
            let balance = client.account().restore_card(client.request(pb::RestoreCardRequest { psn_no, pin })).await?;
            print_balance(balance.get_ref());
        }
        ClientCommand::Admin(command) => admin(client, command).await?,
    }
    Ok(())
}

async fn family(client: &Client, command: FamilyCommand) -> CallResult {
    let relation = |arg: RelationArg| match arg {
        RelationArg::Spouse => pb::Relation::Spouse,
        RelationArg::Parent => pb::Relation::Parent,
        RelationArg::Child => pb::Relation::Child,
        RelationArg::Sibling => pb::Relation::Sibling,
        RelationArg::Grandparent => pb::Relation::Grandparent,
        RelationArg::Grandchild => pb::Relation::Grandchild,
    };
    match command {
        FamilyCommand::List { psn_no, .. } => {
            let family = client.account().list_family(client.request(pb::ListFamilyRequest { psn_no })).await?;
            print_family(family.get_ref());
        }
        FamilyCommand::Register { owner, member, relation: arg, .. } => {
            let request = pb::RegisterFamilyMemberRequest {
                owner_psn_no: owner,
                member_psn_no: member,
                relation: relation(arg) as i32,
            };
            let link = client.account().register_family_member(client.request(request)).await?.into_inner();
            println!(
                "registered {} on {}'s account, usable from {}",
                link.member_psn_no, link.owner_psn_no, link.effective_from
            );
        }
        FamilyCommand::Revoke { owner, member, .. } => {
            let request = pb::RevokeFamilyMemberRequest { owner_psn_no: owner, member_psn_no: member };
            let link = client.account().revoke_family_member(client.request(request)).await?.into_inner();
            println!("revoked {} on {}'s account", link.member_psn_no, link.owner_psn_no);
        }
        FamilyCommand::Order { member, owners, .. } => {
            let request = pb::SetDeductionOrderRequest { member_psn_no: member, owner_psn_nos: owners };
            let family = client.account().set_deduction_order(client.request(request)).await?;
            print_family(family.get_ref());
        }
    }
    Ok(())
}

async fn admin(client: &Client, command: AdminCommand) -> CallResult {
    match command {
        AdminCommand::Person { psn_no, name, birth_date, region, category, status, .. } => {
            let request = pb::UpsertPersonRequest {
                psn_no,
                name,
                birth_date,
                region,
                category: match category {
                    PersonCategoryArg::Employee => pb::PersonCategory::Employee,
                    PersonCategoryArg::Retiree => pb::PersonCategory::Retiree,
                    PersonCategoryArg::Flexible => pb::PersonCategory::Flexible,
                    PersonCategoryArg::Resident => pb::PersonCategory::Resident,
                } as i32,
                status: match status {
                    StatusArg::Active => pb::InsuranceStatus::Active,
                    StatusArg::Suspended => pb::InsuranceStatus::Suspended,
                    StatusArg::Removed => pb::InsuranceStatus::Removed,
                    StatusArg::Terminated => pb::InsuranceStatus::Terminated,
                } as i32,
            };
            let person = client.admin().upsert_person(client.request(request)).await?.into_inner();
            print_person(&person);
        }
        AdminCommand::Institution { code, name, kind, region, .. } => {
            let kind = match kind {
                KindArg::Hospital => pb::InstitutionKind::Hospital,
                KindArg::Pharmacy => pb::InstitutionKind::Pharmacy,
                KindArg::CrossRegionPlatform => pb::InstitutionKind::CrossRegionPlatform,
            } as i32;
            let request = pb::RegisterInstitutionRequest { code, name, kind, region };
            let answer = client.admin().register_institution(client.request(request)).await?.into_inner();
            println!("institution {} registered; its API key (shown once): {}", answer.code, answer.api_key);
        }
        AdminCommand::Key { role, label, .. } => {
            let role = match role {
                RoleArg::Service => pb::Role::Service,
                RoleArg::Operator => pb::Role::Operator,
            } as i32;
            let answer = client
                .admin()
                .issue_api_key(client.request(pb::IssueApiKeyRequest { role, label }))
                .await?
                .into_inner();
            println!("key {} (shown once): {}", answer.key_id, answer.api_key);
        }
        AdminCommand::Adjust { psn_no, amount, direction, reason, value_date, request_id, .. } => {
            let direction = match direction.to_ascii_lowercase().as_str() {
                "credit" => pb::AdjustDirection::Credit,
                "debit" => pb::AdjustDirection::Debit,
                _ => pb::AdjustDirection::Unspecified,
            } as i32;
            let request = pb::AdjustRequest {
                request_id: request_id.unwrap_or_else(|| fresh_request_id("cli-adjust")),
                psn_no,
                amount,
                direction,
                reason,
                value_date,
            };
            let answer = client.admin().adjust(client.request(request)).await?.into_inner();
            println!("entry {}  {}  {}  balance {}", answer.entry_id, answer.psn_no, answer.amount, answer.balance);
        }
        AdminCommand::ResetPin { psn_no, new_pin, .. } => {
            client.admin().reset_pin(client.request(pb::ResetPinRequest { psn_no, new_pin })).await?;
            println!("PIN reset; the lock is cleared");
        }
        AdminCommand::Freeze { psn_no, reason, .. } => {
            let person = client
                .admin()
                .freeze_account(client.request(pb::FreezeAccountRequest { psn_no, reason }))
                .await?
                .into_inner();
            print_person(&person);
        }
        AdminCommand::Unfreeze { psn_no, .. } => {
            let person = client
                .admin()
                .unfreeze_account(client.request(pb::UnfreezeAccountRequest { psn_no }))
                .await?
                .into_inner();
            print_person(&person);
        }
        AdminCommand::Credit { region, period, step, resume_after, .. } => {
            credit(client, region, period, step, resume_after).await?
        }
        AdminCommand::Interest { region, as_of, step, resume_after, .. } => {
            interest(client, region, as_of, step, resume_after).await?
        }
        AdminCommand::TransferOut { psn_no, to_region, request_id, .. } => {
            let request_id = request_id.unwrap_or_else(|| fresh_request_id("cli-transfer-out"));
            let request = pb::TransferOutRequest { request_id, psn_no, to_region };
            print_lifecycle(
                "transferred out",
                &client.admin().transfer_out(client.request(request)).await?.into_inner(),
            );
        }
        AdminCommand::TransferIn { psn_no, from_region, amount, value_date, request_id, .. } => {
            let request_id = request_id.unwrap_or_else(|| fresh_request_id("cli-transfer-in"));
            let request = pb::TransferInRequest { request_id, psn_no, from_region, amount, value_date };
            print_lifecycle("transferred in", &client.admin().transfer_in(client.request(request)).await?.into_inner());
        }
        AdminCommand::Liquidate { psn_no, reason, request_id, .. } => {
            let request_id = request_id.unwrap_or_else(|| fresh_request_id("cli-liquidate"));
            let request = pb::LiquidateRequest { request_id, psn_no, reason };
            print_lifecycle("paid out", &client.admin().liquidate(client.request(request)).await?.into_inner());
        }
        AdminCommand::Import(_) | AdminCommand::Contributions(_) => {
            unreachable!("run() hands imports over before connecting")
        }
    }
    Ok(())
}

/// Calls `call` with where to resume until an answer says the region is done (its `resume_after`
/// is empty), handing each answer to `each`; an interrupted run says how to go on.
async fn in_steps<A>(
    mut after: String,
    mut call: impl AsyncFnMut(String) -> Result<A, tonic::Status>,
    resume_of: fn(&A) -> &str,
    mut each: impl FnMut(A),
) -> CallResult {
    loop {
        let answer = match call(after.clone()).await {
            Ok(answer) => answer,
            Err(status) => {
                if !after.is_empty() {
                    eprintln!("interrupted: what came before was done; go on with --resume-after {after}");
                }
                return Err(status);
            }
        };
        let next = resume_of(&answer).to_string();
        each(answer);
        if next.is_empty() {
            return Ok(());
        }
        after = next;
    }
}

/// Adds an answer's amount to a run's total. (Totals are far above what an input amount may be,
/// so they are read as ledger amounts, not parsed as input.)
fn sum_money(total: &mut Money, text: &str) {
    let amount = Money::from_ledger_text(text).unwrap_or_else(|| {
        eprintln!("warning: the gateway answered an amount {text:?} this client cannot read");
        Money::ZERO
    });
    *total = total.checked_add(amount).unwrap_or(*total);
}

/// Runs RunMonthlyCredit in steps: a progress line after each, the whole run's summary at the end.
async fn credit(client: &Client, region: String, period: String, step: u64, resume_after: String) -> CallResult {
    let started = std::time::Instant::now();
    let (mut accounts, mut credited, mut already, mut back) = (0u64, 0u64, 0u64, 0u64);
    let (mut total, mut mutual_aid) = (Money::ZERO, Money::ZERO);
    let mut skipped: std::collections::BTreeMap<String, u64> = Default::default();
    let mut back_skipped: std::collections::BTreeMap<String, u64> = Default::default();
    let call = async |after: String| {
        let request = pb::RunMonthlyCreditRequest {
            region: region.clone(),
            period: period.clone(),
            resume_after: after,
            max_accounts: step.max(1),
        };
        client.admin().run_monthly_credit(client.request(request)).await.map(|answer| answer.into_inner())
    };
    in_steps(
        resume_after,
        call,
        |a| &a.resume_after,
        |answer| {
            accounts += answer.accounts;
            credited += answer.credited;
            already += answer.already_credited;
            back += answer.back_months_credited;
            sum_money(&mut total, &answer.total);
            sum_money(&mut mutual_aid, &answer.mutual_aid_total);
            for count in answer.skipped_by_reason {
                *skipped.entry(count.reason).or_default() += count.accounts;
            }
            for count in answer.back_months_skipped {
                *back_skipped.entry(count.reason).or_default() += count.accounts;
            }
            if answer.accounts > 0 {
                eprintln!(
                "{region} {period}: {accounts} accounts, {credited} credited, {already} already, {} skipped ({:.0} s)",
                skipped.values().sum::<u64>(),
                started.elapsed().as_secs_f64()
            );
            }
        },
    )
    .await?;
    let list = |map: &std::collections::BTreeMap<String, u64>| {
        if map.is_empty() {
            return "none".to_string();
        }
        map.iter().map(|(reason, n)| format!("{reason} {n}")).collect::<Vec<_>>().join(", ")
    };
    println!("monthly credit {region} {period} done in {:.1} s", started.elapsed().as_secs_f64());
    println!("  accounts looked at   {accounts}");
    println!("  credited             {credited}  (already credited before: {already})");
    println!("  skipped              {}  ({})", skipped.values().sum::<u64>(), list(&skipped));
    println!("  back months credited {back}  (paid months not credited: {})", list(&back_skipped));
    println!("  money credited       {total}");
    println!("  mutual aid deducted  {mutual_aid}");
    Ok(())
}

/// Runs AccrueInterest in steps, like [`credit`].
async fn interest(client: &Client, region: String, as_of: String, step: u64, resume_after: String) -> CallResult {
    let started = std::time::Instant::now();
    let mut sum = pb::AccrueInterestResponse::default();
    let mut total = Money::ZERO;
    let call = async |after: String| {
        let request = pb::AccrueInterestRequest {
            region: region.clone(),
            as_of: as_of.clone(),
            resume_after: after,
            max_accounts: step.max(1),
        };
        client.admin().accrue_interest(client.request(request)).await.map(|answer| answer.into_inner())
    };
    in_steps(
        resume_after,
        call,
        |a| &a.resume_after,
        |answer| {
            sum.accounts += answer.accounts;
            sum.credited += answer.credited;
            sum.already_settled += answer.already_settled;
            sum.closed += answer.closed;
            sum.nothing_due += answer.nothing_due;
            sum.period_start = answer.period_start;
            sum_money(&mut total, &answer.total);
            if answer.accounts > 0 {
                eprintln!(
                    "{region} {as_of}: {} accounts, {} paid, {} already ({:.0} s)",
                    sum.accounts,
                    sum.credited,
                    sum.already_settled,
                    started.elapsed().as_secs_f64()
                );
            }
        },
    )
    .await?;
    println!("interest {region} {}..{as_of} done in {:.1} s", sum.period_start, started.elapsed().as_secs_f64());
    println!("  accounts looked at   {}", sum.accounts);
    println!("  paid interest        {}  (paid before: {})", sum.credited, sum.already_settled);
    println!("  nothing due          {}  (closed: {})", sum.nothing_due, sum.closed);
    println!("  interest paid        {total}");
    Ok(())
}

fn name_of(text: &str, prefix: &str) -> String {
    text.trim_start_matches(prefix).to_string()
}

fn print_settlement(s: &pb::Settlement) {
    let status =
        name_of(pb::SettlementStatus::try_from(s.status).unwrap_or_default().as_str_name(), "SETTLEMENT_STATUS_");
    let auth = name_of(pb::AuthMethod::try_from(s.auth_method).unwrap_or_default().as_str_name(), "AUTH_METHOD_");
    println!(
        "settlement  {}  {status}  (request {})",
        if s.setl_id.is_empty() { "(plan)" } else { &s.setl_id },
        s.request_id
    );
    println!("payer       {}  amount {}", s.psn_no, s.amount);
    println!("acct_pay        {:>10}   own account", s.acct_pay);
    println!("acct_mulaid_pay {:>10}   family accounts", s.acct_mulaid_pay);
    println!("psn_cash_pay    {:>10}   cash", s.psn_cash_pay);
    println!("balc            {:>10}   own balance after", s.balc);
    for debit in &s.debits {
        println!("  from {}{}  {}", debit.owner_psn_no, if debit.family { " (family)" } else { "" }, debit.amount);
    }
    println!("auth {auth}{}  refunded {}", if s.pin_required { " (PIN required)" } else { "" }, s.refunded_amount);
}

fn print_balance(b: &pb::Balance) {
    let account =
        name_of(pb::AccountStatus::try_from(b.account_status).unwrap_or_default().as_str_name(), "ACCOUNT_STATUS_");
    let card = name_of(pb::CardStatus::try_from(b.card_status).unwrap_or_default().as_str_name(), "CARD_STATUS_");
    println!("{}  balance {}  available {}", b.psn_no, b.balance, b.available);
    println!(
        "account {account}  card {card}  no-PIN tier {}  PIN {}{}",
        b.no_pin_tier,
        if b.pin_set { "set" } else { "not set" },
        if b.pin_locked { " (locked)" } else { "" }
    );
}

fn print_lifecycle(what: &str, answer: &pb::LifecycleResponse) {
    let status = name_of(answer.account_status().as_str_name(), "ACCOUNT_STATUS_");
    println!(
        "{}: {what} {} (interest paid first: {}); account {status}",
        answer.psn_no, answer.amount, answer.interest
    );
}

fn print_person(p: &pb::Person) {
    let account =
        name_of(pb::AccountStatus::try_from(p.account_status).unwrap_or_default().as_str_name(), "ACCOUNT_STATUS_");
    println!(
        "{}  {}  born {}  region {}  account {account}  balance {}",
        p.psn_no, p.name, p.birth_date, p.region, p.balance
    );
}

fn print_family(f: &pb::ListFamilyResponse) {
    println!("accounts usable, in deduction order:");
    for (i, account) in f.usable_accounts.iter().enumerate() {
        let relation = name_of(pb::Relation::try_from(account.relation).unwrap_or_default().as_str_name(), "RELATION_");
        let who = if account.own { "own".to_string() } else { format!("as {relation}") };
        println!(
            "  {}. {}  {who}{}",
            i + 1,
            account.owner_psn_no,
            if account.usable_now { "" } else { "  (not usable now)" }
        );
    }
    println!("members registered on this account:");
    for member in &f.members {
        let relation = name_of(pb::Relation::try_from(member.relation).unwrap_or_default().as_str_name(), "RELATION_");
        println!("  {}  {relation}  from {}", member.member_psn_no, member.effective_from);
    }
}
